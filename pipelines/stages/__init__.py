"""The pipeline's stages, in the order the driver runs them; each module exposes NAME and run(ctx)."""

from pipelines.stages import evaluate, graft, pack, score, testbed, train

STAGES = [testbed, train, score, pack, graft, evaluate]
STAGE_NAMES = [s.NAME for s in STAGES]
