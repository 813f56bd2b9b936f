"""The domain + language merge study (recipe `merge-study`): its spec, its merge configs, and one run end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from graft.merge.config import parse_merge_config
from graft.testbed.skills import generate
from pipelines.recipes import check_job
from pipelines.spec import SpecError, parse_job
from pipelines.merging import study_config
from pipelines.stages.merge_study import columns
from tests.conftest import REPO, make_base, run_cli, run_job_file

STUDY_JOB = {"name": "ms", "recipe": "merge-study", "skills": [{"name": "general_ja"}, {"name": "vocab"}], "train": {"method": "full"}}


def job(**sections) -> dict:
    out = {**STUDY_JOB, **sections}
    if "train" not in sections:
        out["train"] = dict(STUDY_JOB["train"])
    return out


def problems_of(data: dict) -> list[str]:
    try:
        check_job(parse_job(data, "j.yaml"), "j.yaml")
    except SpecError as e:
        return e.lines
    return []


def test_the_second_language_is_the_vocabulary_surface_form_over_general_data():
    rows = generate("general_ja", "train", 50, 0)
    assert all(r["prompt"].startswith("utsusu:") and r["answer"] == r["answer"].upper() for r in rows)
    assert all(r["prompt"] == f"utsusu:{r['answer']}=" for r in rows)
    assert any(c.isalpha() for r in rows for c in r["answer"])


def test_the_shipped_job_validates_and_measures_the_vocabulary_in_both_languages():
    spec = parse_job(yaml.safe_load((REPO / "jobs" / "merge_study.yaml").read_text()), "merge_study.yaml")
    recipe = check_job(spec, "merge_study.yaml")
    assert recipe.stages == ("testbed", "train", "score", "pack", "merge", "evolve", "merge_study")
    assert columns(spec) == {"vocab_accuracy_lang2": "vocab_ja", "vocab_accuracy_lang1": "vocab", "general": "general",
                             "general_lang2": "general_ja"}
    assert set(recipe.testbed_skills(spec)) == {"vocab_ja", "general"}  # made by the testbed stage, never trained on
    assert list(spec.merge_study.rows()) == ["linear", "task_arithmetic", "slerp", "ties", "dare_ties"]


@pytest.mark.parametrize("sections, expected", [
    ({"train": {"method": "lora"}}, "merge_study: merging needs full fine-tuned experts (train.method: full), got train.method: lora"),
    ({"merge_study": {"domain": "reverse"}}, "merge_study.domain: 'reverse' is not one of the job's skills (general_ja, vocab)"),
    ({"merge_study": {"domain": "general_ja"}}, "merge_study.domain: the language and domain experts must differ"),
    ({"merge_study": {"merges": [{"method": "ties"}, {"method": "ties"}]}}, "merge_study.merges: two merges are named 'ties'"),
    ({"merge_study": {"merges": [{"method": "tie"}]}}, "merge_study.merges[0].method: unknown merge method 'tie'"),
    ({"merge_study": {"evolve": {"search": "genetic"}}}, "merge_study.evolve.search: unknown merge search 'genetic'"),
    ({"merge_study": {"evolve": {"density": [0.0, 0.5]}}}, "merge_study.evolve: density: expected lo < hi within (0, 1]"),
    ({"merge_study": {"grafts": ["stacked"]}}, "merge_study.grafts[0]: unknown fusion method 'stacked'"),
])
def test_a_study_that_cannot_run_is_refused_naming_the_key(sections, expected):
    lines = problems_of(job(**sections))
    assert any(expected in line for line in lines), lines


def test_each_merge_takes_its_base_model_from_the_method_and_the_entry(tmp_path):
    """Task-vector methods merge deltas against the shared base; slerp starts from the language expert; linear names no
    base (mergekit would average it in as a third model). Each config is one `graft merge` accepts."""
    base, lang, dom = (make_base(tmp_path / n, seed=i) for i, n in enumerate(("base", "lang", "dom")))
    spec = parse_job(job(), "j.yaml").merge_study
    configs = {row: study_config(m, str(base), str(lang), str(dom), "float32", str(base)) for row, m in spec.rows().items()}
    assert "base_model" not in configs["linear"]
    assert configs["slerp"]["base_model"] == str(lang) and configs["slerp"]["parameters"] == {"t": 0.5}
    for row in ("task_arithmetic", "ties", "dare_ties"):
        assert configs[row]["base_model"] == str(base)
    assert configs["ties"]["models"] == [{"model": str(lang), "parameters": {"weight": 1.0, "density": 0.5}},
                                         {"model": str(dom), "parameters": {"weight": 1.0, "density": 0.5}}]
    for row, config in configs.items():
        parsed = parse_merge_config(config, tmp_path / f"{row}.yaml")
        assert parsed.merge_method == spec.rows()[row].method


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The merge study run once on a local base with tiny settings: (its folder, the job it ran)."""
    tmp_path = tmp_path_factory.mktemp("merge-study")
    base = make_base(tmp_path / "base")
    spec = job(base=str(base), output_dir=str(tmp_path / "runs"), tracking={"experiment": "ms"},
               testbed={"train_examples": 40, "eval_examples": 8, "pretrain_examples": 40},
               train={"method": "full", "steps": 3, "batch_size": 4, "warmup_steps": 1, "num_workers": 2, "lr": 1e-3},
               score={"examples": 8, "shards": 1}, graft={"router_examples": 8},
               merge_study={"evolve": {"trials": 2, "search": "random"}, "dev_examples": 4},
               evaluate={"max_new_tokens": 4, "examples": 4})
    proc = run_job_file(tmp_path, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path, spec


@pytest.mark.integration
def test_merge_study_end_to_end_on_a_local_base(study):
    """Two full experts of a local base merged five ways and by a two-trial evolved DARE-TIES, the domain's pack grafted
    into the language expert both ways, every model measured on the vocabulary in both languages and on general data;
    each trial is an MLflow child run, and the evolved config is one `graft merge` runs again."""
    tmp_path, _ = study
    root = tmp_path / "runs" / "ms"
    (report,) = (root / "merge_study").glob("report-*")
    rows = {r["method"]: r for r in json.loads((report / "rows.json").read_text())}
    assert set(rows) == {"base", "language", "domain", "linear", "task_arithmetic", "slerp", "ties", "dare_ties",
                         "evolved_dare_ties", "graft_additive", "graft_routed", "domain_pack"}
    for r in rows.values():
        assert set(r) == {"method", "vocab_accuracy_lang2", "vocab_accuracy_lang1", "general", "general_lang2"}
        assert all(0.0 <= r[k] <= 1.0 for k in r if k != "method")
    (evolved,) = (root / "evolve").glob("evolved_dare_ties-*")
    trials = json.loads((evolved / "trials.json").read_text())
    assert len(trials["trials"]) == 2 and trials["best"]["dev_mean"] == max(t["dev_mean"] for t in trials["trials"])
    assert set(trials["best"]["dev"]) == {"vocab_ja", "vocab", "general", "general_ja"}
    config = yaml.safe_load((evolved / "merge.yaml").read_text())
    assert config["merge_method"] == "dare_ties"
    assert config["models"][0]["parameters"]["weight"] == trials["best"]["params"]["language_weight"]
    again = run_cli("merge", str(evolved / "merge.yaml"), str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ms")
    runs = client.search_runs([exp.experiment_id], "tags.`graftline.stage` = 'evolve'")
    assert sum("graftline.evolve_trial" in r.data.tags for r in runs) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
