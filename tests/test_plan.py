"""`graft plan`: parameter counts on the meta device, per-stage memory against hand-computed values, the fit check.

Every model here is built from its config on the meta device: no weights, no download, no Ray. The 8B/7B/70B
configs are the published architectures (Llama-3-8B, Qwen2-7B, Llama-3-70B); their parameter counts are checked
against closed forms, and the plan's numbers against the same arithmetic written out by hand (within 10%).

Assumptions of the 80 GB node checks: a node of 8 GPUs of 80 GB (10^9 bytes each, below an H100's 85.0), 1000 GB of
RAM (8-GPU nodes ship with 1-2 TB) and 96 cores; LoRA r=8 on every attention and MLP projection; bf16 (DeepSpeed's
`bf16.enabled`, bfloat16 placement); 4 rows of 512 tokens per training worker, the default score and evaluate batch
sizes (1 and 64 rows) with prompts of `train.max_length` tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, Qwen2Config

from graft.memory import shape_from_config, zero_states
from pipelines.plan import Node, PlanError, format_plan, plan_job, refusal, require_fit, stage_problem
from pipelines.recipes import recipe_of
from pipelines.spec import parse_job
from tests.conftest import run_cli

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)
MODELS = {"llama-3-8b": (LlamaConfig, LLAMA3_8B, False), "qwen2-7b": (Qwen2Config, QWEN2_7B, True),
          "llama-70b": (LlamaConfig, LLAMA_70B, False)}
PUBLISHED = {"llama-3-8b": 8.03e9, "qwen2-7b": 7.62e9, "llama-70b": 70.55e9}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NODE_80GB = Node(gpus=8, gpu_gb=80.0, ram_gb=1000.0, cpus=96)
B, S = 4, 512  # rows per training worker, tokens per row
GB = 1e9


def dims(c: dict) -> tuple[int, int, int, int, int, int, int]:
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    return h, c["num_hidden_layers"], heads, kv * (h // heads), c["intermediate_size"], c["vocab_size"], h // heads


def closed_form_params(c: dict, qkv_bias: bool) -> int:
    """Embedding and untied LM head V·h each; per layer q and o h², k and v h·kv_dim (+ biases), three MLP matrices
    h·I, two RMSNorms; a final norm."""
    h, layers, _, kv_dim, inter, vocab, _ = dims(c)
    attention = 2 * h * h + 2 * h * kv_dim + ((h + 2 * kv_dim) if qkv_bias else 0)
    return 2 * vocab * h + layers * (attention + 3 * h * inter + 2 * h) + h


def closed_form_lora(c: dict, rank: int) -> int:
    h, layers, _, kv_dim, inter, _, _ = dims(c)
    return rank * layers * (2 * (h + h) + 2 * (h + kv_dim) + 3 * (h + inter))


def target_weights(c: dict) -> int:
    h, layers, _, kv_dim, inter, _, _ = dims(c)
    return layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)


def korthikanti(c: dict, batch: int, seq: int, act_bytes: int) -> float:
    """Every layer's s·b·h·(34 + 5·a·s/h) bytes (16-bit) scaled to act_bytes, plus logits, their fp32 copy and gradient."""
    h, layers, heads, _, _, vocab, _ = dims(c)
    return layers * seq * batch * h * (34 + 5 * heads * seq / h) * act_bytes / 2 + batch * seq * vocab * (act_bytes + 8)


@pytest.fixture(scope="module")
def shapes():
    return {name: shape_from_config(cls(**cfg), name) for name, (cls, cfg, _) in MODELS.items()}


def checkpoint_folder(folder: Path, name: str) -> Path:
    """A local base holding only config.json (and an empty safetensors file the spec's check looks for): no weights."""
    cls, cfg, _ = MODELS[name]
    folder.mkdir(parents=True, exist_ok=True)
    cls(**cfg).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def job(base: str, **train) -> dict:
    return {"name": "big", "base": base, "skills": [{"name": "reverse"}], "compute": {"accelerator": "cuda"},
            "train": {"zero_stage": 3, "num_workers": 8, "bf16": True, "batch_size": B, "max_length": S, **train}}


def within(value: float, expected: float, tolerance: float = 0.10) -> bool:
    return abs(value - expected) <= tolerance * expected


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_on_the_meta_device_match_the_closed_forms(shapes, name):
    cls, cfg, bias = MODELS[name]
    shape = shapes[name]
    assert shape.params == closed_form_params(cfg, bias)
    assert within(shape.params, PUBLISHED[name], 0.005)
    assert shape.largest_layer == cfg["vocab_size"] * cfg["hidden_size"]  # the embedding (= the untied head)
    assert shape.lora_params(TARGETS, 8) == closed_form_lora(cfg, 8)
    assert shape.target_entries(TARGETS) == target_weights(cfg)
    assert shape.layers == cfg["num_hidden_layers"] and shape.kv_heads == cfg["num_key_value_heads"]


def test_lora_params_of_llama3_8b_r8_are_the_known_20_97_million(shapes):
    assert shapes["llama-3-8b"].lora_params(TARGETS, 8) == 20_971_520


@pytest.mark.parametrize("name", MODELS)
def test_train_score_and_evaluate_match_hand_computed_values(shapes, name):
    cls, cfg, _ = MODELS[name]
    P, T = shapes[name].params, closed_form_lora(cfg, 8)
    h, layers, _, kv_dim, _, vocab, _ = dims(cfg)
    plan = plan_job(parse_job(job("testbed"), "job.yaml"), NODE_80GB, recipe_of("graft"), known={"base": shapes[name]})
    by = {p.stage: p for p in plan.stages}
    # LoRA under ZeRO-3 over 8: every bf16 weight partitioned, trainable grads + fp32 grad + master + Adam (2+4+4+8)
    # partitioned, one gathered layer (the embedding) at 4 bytes a parameter
    train_states = 2 * P / 8 + 18 * T / 8 + 4 * vocab * h
    assert within(by["train"].states, train_states)
    assert within(by["train"].activations, korthikanti(cfg, B, S, 2))
    # Fisher on the merged expert in bf16: weights, and bf16 gradients + fp32 sums of the target matrices
    assert within(by["score"].states, 2 * P + (2 + 4) * target_weights(cfg))
    assert within(by["score"].activations, korthikanti(cfg, 1, S, 2))
    # evaluation: bf16 weights; a KV cache of 64 rows × (512 + 12) tokens, one layer's prefill of the prompts and
    # the last position's logits (bf16 and their fp32 copy)
    heads = cfg["num_attention_heads"]
    kv = 2 * layers * kv_dim * 64 * (S + 12) * 2
    prefill = S * 64 * h * (34 + 5 * heads * S / h)
    assert within(by["evaluate"].states, 2 * P)
    assert within(by["evaluate"].activations, kv + prefill + 64 * vocab * 6)


@pytest.mark.parametrize("name", MODELS)
def test_a_full_fine_tune_in_bf16_uses_deepspeeds_zero3_estimator(shapes, name):
    _, cfg, _ = MODELS[name]
    P = shapes[name].params
    plan = plan_job(parse_job(job("testbed", method="full"), "job.yaml"), NODE_80GB, recipe_of("graft"), known={"base": shapes[name]})
    train = next(p for p in plan.stages if p.stage == "train")
    assert "estimate_zero3_model_states_mem_needs" in train.how
    assert within(train.states, 18 * P / 8 + 4 * cfg["vocab_size"] * cfg["hidden_size"])


def test_own_zero2_arithmetic_equals_deepspeeds_for_a_full_bf16_fine_tune(shapes):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = shapes["llama-3-8b"].params
    _, gpu = estimate_zero2_model_states_mem_needs(P, 8, 1, cpu_offload=False)
    ours = zero_states(trainable=P, frozen=0, weight_bytes=2, mixed=True, stage=2, world=8, largest_layer=0)
    assert abs(ours.device - gpu) <= 8


def test_the_zero_stage_is_the_effective_configs_not_the_field(shapes):
    spec = parse_job(job("testbed", deepspeed={"zero_optimization": {"stage": 2}}), "job.yaml")
    plan = plan_job(spec, NODE_80GB, recipe_of("graft"), known={"base": shapes["llama-3-8b"]})
    train = next(p for p in plan.stages if p.stage == "train")
    assert train.zero_stage == 2 and "ZeRO-2" in train.how


def test_every_stage_of_the_graft_recipe_fits_one_80gb_node_for_8b_with_zero3(tmp_path):
    base = checkpoint_folder(tmp_path / "llama-3-8b", "llama-3-8b")
    spec = parse_job(job(str(base)), "job.yaml")
    plan = plan_job(spec, NODE_80GB)
    assert [p.stage for p in plan.stages] == list(recipe_of("graft").stages)
    assert plan.base.shape.params == closed_form_params(LLAMA3_8B, False)
    for p in plan.stages:
        assert stage_problem(p, NODE_80GB) is None, (p.stage, stage_problem(p, NODE_80GB))
        assert p.peak <= 80 * GB
    assert refusal(plan, "job.yaml") is None
    train = next(p for p in plan.stages if p.stage == "train")
    assert train.zero_stage == 3 and train.tasks == 8 and train.ask == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_70b_full_fine_tune_on_one_80gb_gpu_is_refused_in_one_line_naming_the_stage(tmp_path):
    base = checkpoint_folder(tmp_path / "llama-70b", "llama-70b")
    spec = parse_job(job(str(base), method="full", num_workers=1), "job.yaml")
    with pytest.raises(PlanError) as e:
        require_fit(spec, recipe_of("graft"), "job.yaml", Node(gpus=1, gpu_gb=80.0, ram_gb=2000.0, cpus=96))
    line = str(e.value)
    assert "\n" not in line and line.startswith("job.yaml: stage 'train' does not fit the largest node")
    assert "per GPU worker" in line and "80.0 GB" in line


def test_a_hub_id_base_has_no_known_size_and_is_not_refused():
    spec = parse_job(job("meta-llama/Meta-Llama-3-8B"), "job.yaml")
    plan = plan_job(spec, Node(gpus=1, gpu_gb=1.0, ram_gb=1.0, cpus=1))
    assert refusal(plan, "job.yaml") is None
    assert all(p.unknown == "meta-llama/Meta-Llama-3-8B: size unknown (hub id, not downloaded)"
               for p in plan.stages if p.stage != "testbed")
    assert "size unknown (hub id, not downloaded)" in format_plan(plan, "job.yaml")


def test_the_testbed_base_is_sized_as_the_testbed_builds_it():
    from transformers import AutoModelForCausalLM

    from graft.testbed.models import model_config
    from graft.testbed.tokenizer import build_char_tokenizer

    spec = parse_job({"name": "t", "skills": [{"name": "reverse"}]}, "job.yaml")
    plan = plan_job(spec, NODE_80GB)
    tok = build_char_tokenizer()
    real = AutoModelForCausalLM.from_config(model_config("llama", "tiny", len(tok), tok.pad_token_id, tok.bos_token_id,
                                                         tok.eos_token_id))
    assert plan.base.shape.params == sum(p.numel() for p in real.parameters())


def test_graft_plan_on_the_demo_prints_every_stage_within_100_columns():
    out = run_cli("plan", "jobs/demo.yaml", "--node-ram-gb", "16", "--node-cpus", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines)
    for stage in recipe_of("graft").stages:
        assert any(line.startswith(f"{stage} ") and line.endswith("yes") for line in lines), stage


def test_an_over_size_job_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    base = checkpoint_folder(tmp_path / "llama-70b", "llama-70b")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**job(str(base), method="full", num_workers=1), "output_dir": str(tmp_path / "runs")}))
    node = ["--node-gpus", "1", "--node-gpu-gb", "80", "--node-ram-gb", "2000"]
    planned = run_cli("plan", path, *node)
    assert planned.returncode == 2 and "train " in planned.stdout
    (line,) = planned.stderr.strip().splitlines()
    assert line.startswith(f"graft: error: {path}: stage 'train' does not fit") and "Traceback" not in planned.stderr
    ran = run_cli("run", path, *node)
    assert ran.returncode == 2 and ran.stderr.strip() == line
    assert not (tmp_path / "runs").exists()  # refused before anything ran
