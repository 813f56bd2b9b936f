"""Shared fixtures: tiny real models and adapters built in code (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from contextlib import redirect_stderr, redirect_stdout  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from graft.testbed.models import init_model, model_config  # noqa: E402
from graft.testbed.tokenizer import save_char_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port free now, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: object) -> subprocess.CompletedProcess:
    """`graft ARGS` run in this process by the `main` the console script runs: its exit code, stdout and stderr.

    A subprocess would start Python, torch and transformers again for every command; the tests that
    need the real entry point (`python -m pipelines.cli`) run it as a subprocess themselves.
    """
    from pipelines.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(["graft", *argv], code, out.getvalue(), err.getvalue())


def reverse_skill(folder: Path) -> tuple[Path, Path]:
    """A tiny user skill as JSONL files (`reverse` on eight words; the first four held out): (train, test)."""
    rows = [{"prompt": f"r:{w}=", "answer": w[::-1]} for w in ("abc", "hello", "xyz", "graft", "line", "ray", "tune", "pack")]
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return train, test


def run_job_file(folder: Path, spec: dict) -> subprocess.CompletedProcess:
    """`python -m pipelines.cli run JOB` on `spec` written as `folder/job.yaml` (the real entry point, its own process)."""
    import yaml

    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path)], capture_output=True, text=True, timeout=900)


def make_base(folder: Path, seed: int = 0, family: str = "llama") -> Path:
    tok = save_char_tokenizer(folder)
    cfg = model_config(family, "tiny", len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    init_model(cfg, seed, folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int = 1, targets=("q_proj", "v_proj", "down_proj"), rank: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def adapter(base_model, tmp_path_factory) -> Path:
    return make_adapter(base_model, tmp_path_factory.mktemp("adapter"))
