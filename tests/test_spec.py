import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from pipelines.spec import SpecError, load_job
from tests.conftest import REPO

MINIMAL = {"name": "t", "skills": [{"name": "reverse"}]}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def error_lines(path: Path) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_job(path)
    return e.value.lines


def test_minimal_job_gets_defaults(tmp_path):
    spec = load_job(write(tmp_path, MINIMAL))
    assert spec.train.zero_stage == 2 and spec.train.num_workers == 2 and spec.score.method == "fisher"


def test_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"lora": {"rank": "eight"}}})
    assert error_lines(path) == [f"{path}: train.lora.rank: expected int, got 'eight'"]


def test_unknown_key_and_missing_key(tmp_path):
    path = write(tmp_path, {"name": "t", "trian": {}})
    lines = error_lines(path)
    assert f"{path}: skills: missing required key" in lines
    assert f"{path}: trian: unknown key" in lines


def test_bad_choice_and_list_index(tmp_path):
    path = write(tmp_path, {**MINIMAL, "skills": [{"name": "reverse"}, {"name": "nope"}], "train": {"zero_stage": 4}})
    lines = error_lines(path)
    assert any(line.startswith(f"{path}: skills[1]: ") and "no testbed skill 'nope'" in line for line in lines)
    assert any(line.startswith(f"{path}: train.zero_stage: expected 0, 1, 2 or 3") for line in lines)


def test_missing_data_file_is_named(tmp_path):
    path = write(tmp_path, {**MINIMAL, "skills": [{"name": "mine", "train": "no.jsonl", "eval": "no.jsonl"}]})
    assert error_lines(path) == [f"{path}: skills[0].train: no such file 'no.jsonl'", f"{path}: skills[0].eval: no such file 'no.jsonl'"]


def test_unknown_importance_score_lists_known(tmp_path):
    path = write(tmp_path, {**MINIMAL, "score": {"method": "grasp"}})
    (line,) = error_lines(path)
    assert line.startswith(f"{path}: score.method: unknown importance score 'grasp'") and "fisher" in line


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: t\nskills: [\n")
    (line,) = error_lines(path)
    assert line.startswith(f"{path}: line ") and "not valid YAML" in line


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_validate(job):
    load_job(job)


def test_cli_validate_exit_code_and_nothing_run(tmp_path):
    path = write(tmp_path, {**MINIMAL, "output_dir": str(tmp_path / "runs"), "train": {"lora": {"rank": "eight"}}})
    # the real entry point once; `run` in process (the same `main`)
    for proc in (subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(path)], capture_output=True, text=True),
                 run_cli("run", path)):
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"{path}: train.lora.rank: expected int, got 'eight'"
    assert not (tmp_path / "runs").exists()


def test_an_error_with_details_under_a_header_ends_with_its_cause():
    from pipelines.cli import one_line

    worker = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
                          "  File \"loop.py\", line 1, in f\nKeyError: 'rule'\n")
    assert one_line(worker) == "RuntimeError: Training failed due to worker errors: KeyError: 'rule'"
    assert one_line(ValueError("job.yaml: train.steps: must be > 0\nsecond line")) == "job.yaml: train.steps: must be > 0"


@pytest.mark.parametrize("sparse, key, says", [
    ({"keep_fraction": 0}, "train.sparse.keep_fraction", "greater than 0"),
    ({"keep_fraction": 1.5}, "train.sparse.keep_fraction", "less than or equal to 1"),
    ({"rule": "grasp"}, "train.sparse.rule", "unknown mask rule 'grasp'"),
    ({"match_lora_rank": 0}, "train.sparse.match_lora_rank", "greater than 0"),
])
def test_sparse_settings_that_cannot_work_name_the_key(tmp_path, sparse, key, says):
    path = write(tmp_path, {**MINIMAL, "train": {"method": "sparse", "sparse": sparse}})
    (line,) = error_lines(path)
    assert line.startswith(f"{path}: {key}: ") and says in line
