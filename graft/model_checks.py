"""Checks that a trained model folder is what it claims to be, before anything caches or uses it.

A training run can finish "successfully" and still write a broken model: under ZeRO-3 an ungathered
save writes every partitioned tensor with shape [0], a wrong target list leaves modules untrained, a
diverged run writes NaNs. These checks read the written folder back and refuse it with one line that
names the folder and the tensor:

- `check_adapter`: a PEFT LoRA adapter folder: `adapter_model.safetensors` present and no pickle
  beside it; exactly the lora_A/lora_B tensors PEFT makes for the adapter's config on this base (every
  targeted module, nothing else), each with the shape the module and rank give, none empty or
  non-finite; and PEFT loads it. The base is built on the meta device, so no base weights are read.
- `check_checkpoint`: a full HF checkpoint folder: the same tensor names and shapes as the checkpoint
  training started from, none empty or non-finite, and `AutoModelForCausalLM.from_pretrained` loads
  it (safetensors only) with no weight missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from graft.checkpoint import PICKLE_SUFFIXES, CheckpointError, CheckpointReader

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class ModelCheckError(ValueError):
    """A written model folder that fails its check; the one-line message names the folder and tensor."""


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelCheckError(f"{folder}: holds pickle weights {pickles[0]!r}; only safetensors are accepted")


def _reader(folder: Path) -> CheckpointReader:
    try:
        return CheckpointReader(folder)
    except CheckpointError as e:
        raise ModelCheckError(str(e)) from None


def _check_tensor(folder: Path, name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ModelCheckError(f"{folder}: tensor {name} is empty (shape {list(t.shape)})")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ModelCheckError(f"{folder}: tensor {name} holds NaN or inf values")


def _meta_lora_model(base: Path, config, what: str, trust_remote_code: bool):
    """The PEFT model LoraConfig `config` makes on `base`, every weight on the meta device (no weight is read)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base_config = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config, trust_remote_code=trust_remote_code)
        try:
            return get_peft_model(model, config, low_cpu_mem_usage=True)
        except ValueError as e:  # e.g. a target module the base lacks
            raise ModelCheckError(f"{what}: PEFT cannot apply it to {base} ({str(e).splitlines()[0]})") from None


def check_lora_targets(base: str | Path, target_modules: list[str], *, trust_remote_code: bool = False) -> list[str]:
    """The base's modules a LoRA with `target_modules` adapts; ModelCheckError when a target matches none.

    Run before training, so a target list that cannot work fails at once, not after the workers start.
    """
    from peft import LoraConfig

    model = _meta_lora_model(Path(base), LoraConfig(target_modules=list(target_modules)), f"LoRA target_modules {list(target_modules)}",
                             trust_remote_code)
    return sorted(model.base_model.targeted_module_names)


def check_adapter(folder: str | Path, base: str | Path, *, trust_remote_code: bool = False) -> int:
    """Refuse (ModelCheckError) a LoRA adapter folder that is not complete and loadable on `base`; returns its tensor count."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    folder, base = Path(folder), Path(base)
    if not folder.is_dir():
        raise ModelCheckError(f"{folder}: not an adapter folder")
    _refuse_pickles(folder)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise ModelCheckError(f"{folder}: no {name}")
    reader = _reader(folder)
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ModelCheckError(f"{folder / ADAPTER_CONFIG}: not a PEFT LoRA config ({str(e).splitlines()[0]})") from None
    model = _meta_lora_model(base, config, f"adapter {folder}", trust_remote_code)
    expected = {k: list(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if not expected:
        raise ModelCheckError(f"{folder}: the adapter's config targets no module of {base}")
    for key, shape in expected.items():
        if key not in reader:
            raise ModelCheckError(f"{folder}: missing tensor {key} (a module the adapter targets)")
        if reader.shape(key) != shape:
            raise ModelCheckError(f"{folder}: tensor {key} has shape {reader.shape(key)}, expected {shape} "
                                  f"(the module's size and rank {model.peft_config['default'].r})")
    for key in reader.keys():
        if key not in expected:
            raise ModelCheckError(f"{folder}: tensor {key} belongs to no module the adapter targets on {base}")
    weights = {}
    for key in reader.keys():
        weights[key] = reader.get(key)
        _check_tensor(folder, key, weights[key])
    result = set_peft_model_state_dict(model, weights, low_cpu_mem_usage=True)
    if result.unexpected_keys:
        raise ModelCheckError(f"{folder}: PEFT did not load tensor {sorted(result.unexpected_keys)[0]}")
    return len(weights)


def check_checkpoint(folder: str | Path, reference: str | Path, *, trust_remote_code: bool = False) -> int:
    """Refuse (ModelCheckError) a full checkpoint unlike `reference` (its architecture) or not loadable; returns its tensor count."""
    from transformers import AutoModelForCausalLM

    folder, reference = Path(folder), Path(reference)
    if not folder.is_dir():
        raise ModelCheckError(f"{folder}: not a checkpoint folder")
    _refuse_pickles(folder)
    written, ref = _reader(folder), _reader(reference)
    for key in ref.keys():
        if key not in written:
            raise ModelCheckError(f"{folder}: missing tensor {key} (present in {reference})")
        if written.shape(key) != ref.shape(key):
            raise ModelCheckError(f"{folder}: tensor {key} has shape {written.shape(key)}, expected {ref.shape(key)} as in {reference}")
    for key in written.keys():
        if key not in ref:
            raise ModelCheckError(f"{folder}: tensor {key} is not in {reference}")
    for key, t in written.items():
        _check_tensor(folder, key, t)
    try:
        _, info = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelCheckError(f"{folder}: does not load ({str(e).splitlines()[0]})") from None
    if info.get("missing_keys"):
        raise ModelCheckError(f"{folder}: loading leaves tensor {sorted(info['missing_keys'])[0]} uninitialised")
    return len(written.keys())


def check_sparse_targets(base: str | Path, target_modules: list[str], keep_fraction: float, lora_rank: int | None = None, *,
                         trust_remote_code: bool = False) -> list[str]:
    """The base's linear modules a sparse adapter with `target_modules` adapts; ModelCheckError when a target matches
    none or a non-linear module, or when `keep_fraction` asks some module for more entries than it has.

    Run before training, on the meta device (no weight is read), so a setting that cannot work fails at once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from graft.sparse import SparseError, shira_rank, target_linears

    config = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    try:
        modules = target_linears(model, target_modules)
        shira_rank([tuple(m.weight.shape) for m in modules.values()], keep_fraction, lora_rank)
    except SparseError as e:
        raise ModelCheckError(f"sparse adapter on {base}: {e}") from None
    return sorted(modules)


def check_sparse_adapter(folder: str | Path, base: str | Path, *, trust_remote_code: bool = False) -> int:
    """Refuse (ModelCheckError) a sparse (SHiRA) adapter folder that does not apply to `base`; returns its kept entries."""
    from graft.sparse import SparseError, read_sparse_deltas

    folder = Path(folder)
    if folder.is_dir():
        _refuse_pickles(folder)
    try:
        return sum(d.kept for d in read_sparse_deltas(folder, base).values())
    except (SparseError, CheckpointError) as e:
        raise ModelCheckError(str(e)) from None
