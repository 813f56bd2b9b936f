"""Safetensors only, everywhere: every call that can load weights is made so it cannot unpickle.

Walks the AST of graftline's own code (graft/, pipelines/, benchmarks/) and fails on:
- `X.from_pretrained(...)` of anything but a tokenizer or config without `use_safetensors=True`
  (PeftModel has no such switch: its one call is in `graft.lora.load_adapter`, which refuses a folder
  without `adapter_model.safetensors` before PEFT looks);
- `torch.load(...)` without `weights_only=True`, `pickle.load(s)`, `joblib.load`, and
  `trust_remote_code=True` written as a literal.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

NO_WEIGHTS = ("Tokenizer", "Config", "LoraConfig", "GenerationConfig", "Processor")
PEFT_LOADERS = {("graft/lora.py", "load_adapter")}
ROOTS = ("graft", "pipelines", "benchmarks")


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _callee(call: ast.Call) -> tuple[str, str]:
    """(object, attribute) of `obj.attr(...)`, e.g. ("AutoModelForCausalLM", "from_pretrained")."""
    f = call.func
    if isinstance(f, ast.Attribute):
        base = f.value
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
        return name, f.attr
    return "", f.id if isinstance(f, ast.Name) else ""


def problems_in(path: Path, source: str) -> list[str]:
    """Every unsafe load call in `source` (a file of graftline), as 'file:line: what'."""
    rel = path.relative_to(REPO).as_posix() if path.is_absolute() else str(path)
    out = []
    tree = ast.parse(source)
    functions = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                functions.setdefault(id(node), fn.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        obj, attr = _callee(node)
        where = f"{rel}:{node.lineno}"
        if attr == "from_pretrained" and not obj.endswith(NO_WEIGHTS):
            if obj == "PeftModel":
                if (rel, functions.get(id(node))) not in PEFT_LOADERS:
                    out.append(f"{where}: PeftModel.from_pretrained outside graft.lora.load_adapter (which refuses pickles)")
            elif not _is_true(_keyword(node, "use_safetensors")):
                out.append(f"{where}: {obj}.from_pretrained without use_safetensors=True")
        if (obj, attr) == ("torch", "load") and not _is_true(_keyword(node, "weights_only")):
            out.append(f"{where}: torch.load without weights_only=True")
        if (obj, attr) in {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load")}:
            out.append(f"{where}: {obj}.{attr} unpickles")
        if _is_true(_keyword(node, "trust_remote_code")):
            out.append(f"{where}: trust_remote_code=True written in the code (it comes from the job spec only)")
    return out


def test_every_load_call_in_graftline_is_safetensors_only():
    found = []
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            found += problems_in(path, path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line, bad", [
    ("AutoModelForCausalLM.from_pretrained(p)", True),
    ("AutoModelForCausalLM.from_pretrained(p, use_safetensors=True)", False),
    ("transformers.AutoModel.from_pretrained(p, use_safetensors=False)", True),
    ("AutoTokenizer.from_pretrained(p)", False),
    ("PeftModel.from_pretrained(m, p)", True),
    ("torch.load(f)", True),
    ("torch.load(f, weights_only=True)", False),
    ("pickle.loads(b)", True),
    ("AutoModel.from_pretrained(p, use_safetensors=True, trust_remote_code=True)", True),
])
def test_the_checker_catches_what_it_should(line, bad):
    assert bool(problems_in(Path("x.py"), line)) is bad
