"""The pipeline's stages by name. Each stage module declares its contract and does one job:

- `NAME`: the stage's name in recipes, MLflow runs and output folders;
- `READS` / `WRITES`: the artifact types (`pipelines.artifacts`) it takes from the board and adds to it;
- `SECTIONS`: the job spec sections it reads (a job's MLflow params hold only its recipe's);
- `testbed_skills(spec) -> list[str]` (optional): testbed datasets the stage reads beyond the job's skills (the
  testbed stage makes them);
- `problems(spec) -> list[str]` (optional): what the stage finds wrong across the job's sections, each
  line naming the key (checked by `graft validate` with the recipe, before anything runs);
- `run(ctx) -> StageResult`: builds a typed request per output item (its hash is the item's content
  key), runs it (fanned out on Ray where it pays), and returns what it wrote in `StageResult.artifacts`.
"""

from types import ModuleType

from pipelines.stages import (
    concepts, distill, dpo, evaluate, evolve, graft, merge, merge_study, pack, port, port_eval, score, testbed, train, transplant,
)

STAGES: dict[str, ModuleType] = {m.NAME: m for m in (testbed, distill, train, dpo, score, pack, graft, evaluate, port, port_eval, concepts,
                                                  transplant, merge, evolve, merge_study)}
