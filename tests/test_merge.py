"""graft.merge: parity with mergekit 0.1.5 (golden outputs), DARE semantics, config and CLI errors."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from graft.checkpoint import CheckpointReader
from graft.merge import MERGE_METHODS, MergeConfigError, load_merge_config, plan_merge, run_merge
from graft.merge.sparsify import EXACT_SELECT_MAX, kth_largest_abs, random_, top_k_mask

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_merge_golden import with_paths
from merge_models import TINY, base_tensors, build_tiny_models, llama_config, write_model

CASES = json.loads((FIXTURES / "merge_golden_cases.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("merge_models"))


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "merge_golden.safetensors"))


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    return dict(CheckpointReader(folder).items())


def ties_cfg(tiny: dict[str, Path], **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(tiny["base"]), "models": [
        {"model": str(tiny["ft_a"]), "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": str(tiny["ft_b"]), "parameters": {"weight": 0.5, "density": 0.5}}], **extra}


# --- parity with mergekit ------------------------------------------------------------------------------

def test_all_methods_registered():
    assert set(MERGE_METHODS.names()) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp",
                                          "magnitude_prune"}
    assert {c["merge_method"] for c in CASES.values()} >= {"linear", "task_arithmetic", "ties", "slerp", "magnitude_prune"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit_golden(case, tiny, golden, tmp_path):
    out = run_merge(write_yaml(tmp_path / "merge.yaml", with_paths(CASES[case], tiny)), tmp_path / "out")
    got = read_all(out)
    want = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(case + "/")}
    assert want and set(got) == set(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-5, f"{case}: max |graftline - mergekit| = {worst}"


# --- DARE: random, so semantics instead of goldens --------------------------------------------------------

def test_dare_keeps_expected_density_and_rescale_preserves_expectation():
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    kept = random_(delta.clone(), 0.3, rescale=False, generator=torch.Generator().manual_seed(1))
    assert abs(float((kept != 0).float().mean()) - 0.3) < 0.005
    assert torch.equal(kept[kept != 0], delta[kept != 0])  # survivors are untouched without rescale
    rescaled = random_(delta.clone(), 0.3, rescale=True, generator=torch.Generator().manual_seed(1))
    assert math.isclose(float(rescaled.abs().sum()), float(delta.abs().sum()), rel_tol=1e-4)  # L1 kept (mergekit)
    small = delta[:1000]
    mean = sum(random_(small.clone(), 0.3, True, torch.Generator().manual_seed(s)) for s in range(2000)) / 2000
    # E[drop + rescale] = delta: per entry the error of a 2000-draw mean is ~|x|·sqrt((1-p)/p/2000) ≈ 0.034|x|
    assert float((mean - small).abs().mean()) < 0.06 * float(small.abs().mean())
    plain = sum(random_(small.clone(), 0.3, False, torch.Generator().manual_seed(s)) for s in range(2000)) / 2000
    assert float((plain - 0.3 * small).abs().mean()) < 0.06 * float(small.abs().mean())  # without rescale: 0.3·delta


def test_dare_is_deterministic_under_a_seed(tiny, tmp_path):
    for method in ("dare_ties", "dare_linear"):
        cfg = write_yaml(tmp_path / f"{method}.yaml", dict(ties_cfg(tiny), merge_method=method))
        a = read_all(run_merge(cfg, tmp_path / f"{method}_a", seed=7))
        b = read_all(run_merge(cfg, tmp_path / f"{method}_b", seed=7))
        c = read_all(run_merge(cfg, tmp_path / f"{method}_c", seed=8))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)
        base = read_all(tiny["base"])
        # density 0.5 on both fine-tunes: roughly a quarter of coordinates keep no delta at all
        k = "model.layers.0.mlp.up_proj.weight"
        untouched = float((a[k] == base[k]).float().mean())
        assert 0.15 < untouched < 0.35


# --- exact selection --------------------------------------------------------------------------------------

def test_kth_largest_exact_on_big_tensors_and_top_k_counts_ties():
    x = torch.randn(EXACT_SELECT_MAX + 12345, generator=torch.Generator().manual_seed(3)).abs()
    for k in (1, 1000, x.numel() // 2, x.numel() - 5):
        assert kth_largest_abs(-x, k)[0] == torch.kthvalue(x, x.numel() - k + 1).values
    ties = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    mask = top_k_mask(ties, 3)
    assert int(mask.sum()) == 3 and mask[0] and mask[2] and mask[3] and not mask[4]


def _trim_task(n: int, weights: tuple[float, ...], densities: tuple[float, ...], normalize: bool, seed: int = 5):
    """A TensorTask over n entries whose deltas sit on a coarse grid: many exact ties at any threshold."""
    from graft.merge.base import TensorTask

    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen) * 0.02
    inputs = [base + torch.round(torch.randn(n, generator=gen) * 6) / 300 for _ in weights]
    params = {"normalize": normalize, "rescale": False, "lambda": 1.0}
    return lambda threads=1: TensorTask("t", [t.clone() for t in inputs], base.clone(), params,
                                        [{"weight": w, "density": d} for w, d in zip(weights, densities)], threads=threads)


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("weights,normalize", [((1.0, 0.8), True), ((1.0, -1.0), True), ((0.5, 0.7, 1.2), False)])
def test_one_pass_trim_equals_the_exact_two_pass_merge(consensus, weights, normalize, monkeypatch):
    """merge_trimmed (ties, magnitude_prune) brackets each threshold from a sample, merges in one pass and settles the
    entries inside the brackets afterwards: bit for bit what the exact threshold gives, surplus ties included, on one
    thread or several, and when a bracket misses (then it redoes the tensor the exact way)."""
    from graft.merge import sparsify, task_vectors
    from graft.merge.task_vectors import magnitude_survivors, merge_task_vectors, merge_trimmed

    n = sparsify.BRACKET_MIN + 3 * sparsify.CHUNK + 17
    densities = (0.3, 0.6, 0.5)[: len(weights)]
    task = _trim_task(n, weights, densities, normalize)
    exact = merge_task_vectors(task(), magnitude_survivors, consensus)
    exact_way = []  # merge_trimmed's fallback: it must not be what makes the results equal
    monkeypatch.setattr(task_vectors, "merge_task_vectors", lambda *a: exact_way.append(1) or merge_task_vectors(*a))
    assert torch.equal(merge_trimmed(task(), consensus), exact)
    assert torch.equal(merge_trimmed(task(threads=3), consensus), exact)
    single = _trim_task(n, (1.0,), (0.3,), False)
    assert torch.equal(merge_trimmed(single(), False), merge_task_vectors(single(), magnitude_survivors, False))
    assert not exact_way

    monkeypatch.setattr(sparsify.Bracket, "resolve", lambda self, above, window, where: None)  # a missed bracket
    assert torch.equal(merge_trimmed(task(), consensus), exact) and exact_way


def test_bracket_holds_the_kth_largest_and_widens_for_correlated_runs():
    from graft.merge.sparsify import RUN, RUNS, Bracket

    gen = torch.Generator().manual_seed(1)
    n, k = 10_000_000, 3_000_000
    iid = torch.randn(RUNS, RUN, generator=gen).abs()
    rows = (torch.randn(RUNS, RUN, generator=gen) * torch.rand(RUNS, 1, generator=gen) * 4).abs()  # a scale per run
    narrow, wide = Bracket.of(iid, k, n), Bracket.of(rows, k, n)
    q = torch.quantile(iid.reshape(-1), 1 - k / n)
    assert narrow.lo <= q <= narrow.hi
    share = lambda b, x: float(((x >= b.lo) & (x <= b.hi)).float().mean())  # noqa: E731
    assert share(narrow, iid) < 0.05 < share(wide, rows)


# --- outputs ----------------------------------------------------------------------------------------------

def test_merged_folder_loads_with_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_merge(write_yaml(tmp_path / "m.yaml", ties_cfg(tiny)), tmp_path / "out")
    assert (out / "config.json").is_file() and (out / "graft_merge.yml").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    merged = read_all(out)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"], merged["model.layers.1.mlp.down_proj.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_progress_reports_every_tensor_once_in_plan_order(tiny, tmp_path):
    from graft.merge import execute_plan

    plan = plan_merge(load_merge_config(write_yaml(tmp_path / "m.yaml", ties_cfg(tiny))))
    seen: list[tuple[int, int, str]] = []
    execute_plan(plan, tmp_path / "out", workers=2, progress=lambda done, total, name: seen.append((done, total, name)))
    names = [tp.name for tp in plan.tensors]
    assert seen == [(i, len(names), n) for i, n in enumerate(names, 1)]


def test_small_shards_dtype_and_tokenizer_source(tiny, tmp_path):
    (tiny["ft_b"] / "tokenizer.json").write_text('{"from": "ft_b"}')
    cfg = write_yaml(tmp_path / "m.yaml", ties_cfg(tiny, dtype="bfloat16", tokenizer_source=str(tiny["ft_b"])))
    out = run_merge(cfg, tmp_path / "out", max_shard_bytes=8 * 1024)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 2
    merged = read_all(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "ft_b"}


# --- refusals ---------------------------------------------------------------------------------------------

def _bad_model(tiny: dict[str, Path], folder: Path, edit) -> Path:
    tensors = load_file(str(tiny["ft_b"] / "model.safetensors"))
    edit(tensors)
    return write_model(folder, llama_config(**TINY), tensors)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(3, 3)), "has shape [3, 3]"),
    (lambda t: t.pop("model.norm.weight"), "is missing"),
])
def test_shape_or_key_mismatch_is_refused_before_writing(tiny, tmp_path, edit, needle):
    bad = _bad_model(tiny, tmp_path / "bad", edit)
    cfg = ties_cfg(tiny)
    cfg["models"][1]["model"] = str(bad)
    with pytest.raises(ValueError) as e:
        run_merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    msg = str(e.value)
    assert needle in msg and str(bad) in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_nan_is_refused_naming_the_tensor(tiny, tmp_path):
    def poison(t):
        t["model.layers.2.self_attn.q_proj.weight"][0, 0] = float("nan")

    bad = _bad_model(tiny, tmp_path / "nan", poison)
    cfg = ties_cfg(tiny)
    cfg["models"][1]["model"] = str(bad)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight.*NaN"):
        run_merge(write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("change, key", [
    (lambda c: c.update(merge_method="tiess"), "merge_method: unknown merge method 'tiess'; known: dare_linear"),
    (lambda c: c.pop("base_model"), "base_model: required by ties"),
    (lambda c: c["models"][0]["parameters"].update(densty=0.5), "models[0].parameters.densty: unknown parameter"),
    (lambda c: c["models"][1]["parameters"].update(density="lots"), "models[1].parameters.density: "),
    (lambda c: c["models"][1]["parameters"].pop("weight"), "models[1].parameters.weight: required by ties"),
    (lambda c: c["models"][0].update(model="/no/such/model"), "models[0].model: no such model folder"),
    (lambda c: c.update(slices=[]), "slices: not supported"),
    (lambda c: c.update(dtype="float8"), "dtype: unknown dtype 'float8'"),
    (lambda c: c.update(merge_method="slerp", parameters={"t": 0.5}), "models: slerp takes 2 models"),
    (lambda c: c.update(parameters={"weight": [{"filter": "mlp", "value": 1}, 2]}), "parameters.weight: a list mixes"),
])
def test_config_errors_name_file_and_key(tiny, tmp_path, change, key):
    cfg = ties_cfg(tiny)
    change(cfg)
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(MergeConfigError) as e:
        plan_merge(load_merge_config(path))
    assert str(e.value).startswith(f"{path}: ") and key in str(e.value) and "\n" not in str(e.value)


def test_filter_that_leaves_a_tensor_without_a_required_value(tiny, tmp_path):
    cfg = ties_cfg(tiny)
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 1.0}]
    with pytest.raises(MergeConfigError, match=r"models\[1\]\.parameters\.weight: required by ties; nothing applies"):
        plan_merge(load_merge_config(write_yaml(tmp_path / "m.yaml", cfg)))


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("merge_method: ties\nmodels: [\n")
    with pytest.raises(MergeConfigError, match=r"broken\.yaml: not valid YAML"):
        load_merge_config(path)


# --- CLI --------------------------------------------------------------------------------------------------

def test_cli_bad_config_exits_2_with_one_line(tiny, tmp_path, capsys):
    from pipelines.cli import main

    cfg = ties_cfg(tiny)
    cfg["models"][0]["parameters"]["weight"] = "heavy"
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "models[0].parameters.weight" in err
    assert not (tmp_path / "out").exists()


def test_cli_merges(tiny, tmp_path, capsys):
    from pipelines.cli import main

    path = write_yaml(tmp_path / "ok.yaml", ties_cfg(tiny))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --- layering ---------------------------------------------------------------------------------------------

def test_graft_merge_imports_no_orchestration():
    banned = {"ray", "mlflow", "deepspeed", "pipelines"}
    for f in (Path(__file__).parents[1] / "graft" / "merge").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in banned for n in names), f"{f.name} imports {names}"


def test_base_tensors_helper_is_deterministic():
    cfg = llama_config(**TINY)
    a, b = base_tensors(cfg), base_tensors(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- streaming ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "magnitude_prune"])
def test_streamed_merge_equals_the_in_memory_merge(method, tmp_path):
    """The executor reads inputs and base chunk by chunk; the result must be what the method computes on whole
    tensors, including the sampled selection path (a tensor above EXACT_SELECT_MAX) and surplus ties."""
    from safetensors.torch import save_file

    from graft.merge.base import TensorTask

    gen = torch.Generator().manual_seed(7)
    shapes = {"model.embed_tokens.weight": (EXACT_SELECT_MAX // 512 + 3, 512), "model.layers.0.mlp.up_proj.weight": (48, 32)}
    models = {}
    for i, name in enumerate(("base", "a", "b")):
        # deltas rounded to a coarse grid: many exact ties at the selection threshold
        models[name] = {k: (torch.randn(s, generator=gen) * 0.02 if i == 0 else models["base"][k] + torch.round(
            torch.randn(s, generator=gen) * 8) / 400) for k, s in shapes.items()}
        (tmp_path / name).mkdir()
        save_file(models[name], str(tmp_path / name / "model.safetensors"))
    per = [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.6}]
    cfg = {"merge_method": method, "base_model": str(tmp_path / "base"), "parameters": {"normalize": True},
           "models": [{"model": str(tmp_path / n), "parameters": p} for n, p in zip("ab", per)]}
    if method == "task_arithmetic":
        cfg["models"] = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in cfg["models"]]
    plan = plan_merge(load_merge_config(write_yaml(tmp_path / "m.yaml", cfg)))
    assert plan.spec.streams_base
    merged = read_all(run_merge(plan.config, tmp_path / "out", seed=3))
    for tp in plan.tensors:
        task = TensorTask(tp.name, [models[n][tp.name].clone() for n in "ab"], models["base"][tp.name].clone(),
                          tp.params, list(tp.model_params), seed=3)
        assert torch.equal(merged[tp.name], MERGE_METHODS.get(method)(task)), tp.name
    big = "model.embed_tokens.weight"
    if method in ("ties", "magnitude_prune"):  # exactly int(density * n) entries of the first delta survive
        only_a = read_all(run_merge(load_merge_config(write_yaml(tmp_path / "a.yaml", {**cfg, "models": cfg["models"][:1]})),
                                    tmp_path / "out_a"))
        kept = int(torch.count_nonzero(only_a[big] != models["base"][big]))
        assert kept == int(0.3 * models["base"][big].numel())


# --- differences from mergekit explained by threshold ties (benchmarks/merge_speed.py) ------------------------

def _merge_speed():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import merge_speed

    return merge_speed


def test_threshold_tie_explains_a_difference_and_nothing_else_does():
    ms = _merge_speed()
    base = torch.zeros(6)
    ft = torch.tensor([3.0, -2.0, 2.0, 1.0, 0.5, -2.0])  # density 0.5: k = 3; |delta| = 2 at 1, 2, 5: 3 entries for 2 slots
    assert ms.threshold_ties(base, [ft], [0.5]).tolist() == [False, True, True, False, False, True]
    ours = ft * top_k_mask(ft.abs(), 3)  # the lowest indices win: 0, 1, 2
    assert (ours != 0).tolist() == [True, True, True, False, False, False]
    theirs = ft * torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])  # another tool kept the tie at 5 instead of 1
    agree = ms.compare_tensor(ours, theirs, base, [ft], [0.5])
    assert (agree.differing, agree.outside_ties, agree.all_ties, agree.max_abs_diff_outside_ties) == (2, 0, True, 0.0)

    off = ours.clone()
    off[3] += 1e-6  # index 3 is below the threshold: no tie explains it
    agree = ms.compare_tensor(ours, off, base, [ft], [0.5])
    assert (agree.differing, agree.outside_ties, agree.all_ties) == (1, 1, False)
    assert agree.max_abs_diff_outside_ties == pytest.approx(1e-6, rel=1e-3)

    # a threshold reached by exactly k entries is no tie: index 3 below is the unique largest of the second fine-tune
    ft2 = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0])
    assert not ms.threshold_ties(base, [ft, ft2], [0.5, 0.2])[3]
    assert not ms.compare_tensor(ours, off, base, [ft, ft2], [0.5, 0.2]).all_ties
