"""Plan a merge from a `MergeConfig`, then stream it tensor by tensor into an atomic output folder.

Planning opens every model lazily (headers only), checks that all models hold the same tensor names
and shapes, and resolves every parameter for every tensor, so a bad config or a mismatched model fails
before anything is written. The output layout (names, shapes, dtypes) is then known, so each shard
file gets its header first and every merged tensor goes to disk as soon as it is computed, in plan
order. The task-arithmetic family (`streams_base` methods) reads its inputs and base chunk by chunk
straight from the checkpoint files, so the only whole tensors in memory are the results being
written; other methods (linear, slerp) read each input tensor whole. Config and tokenizer files come
from the base model (or `tokenizer_source`); the YAML is kept beside the weights as `graft_merge.yml`.

Precision (`_compute_dtype`): floating tensors are merged in fp32 whatever their stored dtype, and in
fp64 only when the config's `dtype:` (or, without one, the stored dtype) is float64. With `dtype:` set,
each input is first cast to it (bf16 weights under `dtype: float16` are rounded to fp16) and then widened
to fp32 for the arithmetic. The result is rounded once, on writing, to `out_dtype:`, else `dtype:`, else
the dtype the reference model stores: bf16 or fp16 inputs merged with neither key are computed in fp32
and written in their own dtype. mergekit 0.1.5 computes in the dtype it loads (`dtype:`, else the stored
one), so on bf16 inputs its deltas, weighted sums and divisions are each rounded to bf16; the two tools
then agree only to about bf16 precision, and a delta rounded differently can fall on the other side of
the TIES threshold. On fp32 inputs both compute in fp32 and differ only where the trim's tie rule does
(see `sparsify`). Non-floating tensors must be equal in every model and are copied as they are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graft.atomic import atomic_dir
from graft.checkpoint import CheckpointReader, copy_side_files, stream_shards
from graft.merge.base import MERGE_METHODS, BasePolicy, Flat, MethodSpec, Scope, TensorTask, spec_of
from graft.merge.config import MergeConfig, MergeConfigError, load_merge_config
from graft.merge.params import LAYER, layer_t, resolve
from graft.safetensors_io import Slot

DEFAULT_SHARD_BYTES = 128 * 1024**2  # shard files are streamed, not buffered: the size only sets the file count
DEFAULT_INFLIGHT_BYTES = 64 * 1024**2  # inputs of the tensors being merged concurrently (one tensor always proceeds)
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "sentencepiece")


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name and the parameters resolved for it."""

    name: str
    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class MergePlan:
    """Readers in input order plus one `TensorPlan` per output tensor, all checked."""

    config: MergeConfig
    spec: MethodSpec
    base: CheckpointReader | None  # the delta reference (None for methods that ignore the base)
    inputs: tuple[CheckpointReader, ...]  # what `TensorTask.tensors` holds, in this order
    tensors: tuple[TensorPlan, ...]

    @property
    def reference(self) -> CheckpointReader:
        return self.base if self.base is not None else self.inputs[0]


def _check_same_tensors(reference: CheckpointReader, other: CheckpointReader) -> None:
    ref_names, names = reference.keys(), other.keys()
    missing = sorted(set(ref_names) - set(names))
    if missing:
        raise ValueError(f"{other.folder}: tensor {missing[0]!r} is missing (present in {reference.folder})")
    extra = sorted(set(names) - set(ref_names))
    if extra:
        raise ValueError(f"{other.folder}: tensor {extra[0]!r} is not in {reference.folder}")
    for k in ref_names:
        if other.shape(k) != reference.shape(k):
            raise ValueError(f"{other.folder}: tensor {k!r} has shape {other.shape(k)}, "
                             f"but {reference.folder} has {reference.shape(k)}")


def _model_order(name: str) -> tuple[int, int, str]:
    """Embeddings, then layers in numeric order, then the rest, the LM head last.

    Besides giving the output a natural order, this keeps the two largest tensors (embeddings and LM
    head) apart, so one is never held in the current output shard while the other is being merged.
    """
    m = LAYER.search(name)
    group = 0 if "embed" in name else 1 if m else 3 if "lm_head" in name else 2
    return group, int(m.group(1)) if m else 0, name


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open the models, check them against each other and resolve all parameters (nothing is written)."""
    spec = spec_of(config.merge_method)
    entries = {m.path: m for m in config.models}
    if spec.base is BasePolicy.REQUIRED:
        input_paths = [m.path for m in config.models if m.path != config.base_model]
    else:
        input_paths = [m.path for m in config.models]
        if config.base_model is not None and config.base_model not in entries:
            input_paths.append(config.base_model)  # mergekit merges a named base as one more input
    readers = {p: CheckpointReader(p) for p in dict.fromkeys([*input_paths, *([config.base_model] if config.base_model else [])])}
    base = readers[config.base_model] if spec.base is BasePolicy.REQUIRED else None
    inputs = tuple(readers[p] for p in input_paths)
    reference = base if base is not None else inputs[0]
    for reader in readers.values():
        if reader is not reference:
            _check_same_tensors(reference, reader)

    names = sorted(reference.keys(), key=_model_order)
    num_layers = len({m.group(1) for n in names if (m := LAYER.search(n))})
    shared = [p for p in spec.params if p.scope is Scope.SHARED]
    per_input = [p for p in spec.params if p.scope is not Scope.SHARED]
    plans = []
    for name in names:
        t = layer_t(name, num_layers)
        try:
            params = {p.name: resolve(p, [config.parameters], name, t) for p in shared}
        except KeyError as e:
            raise config.error(f"parameters.{e.args[0]}", f"required by {config.merge_method}; nothing applies to {name!r}") from None
        model_params = []
        for path in input_paths:
            entry = entries.get(path)
            scopes = [entry.parameters, config.parameters] if entry else [config.parameters]
            try:
                model_params.append({p.name: resolve(p, scopes, name, t) for p in per_input})
            except KeyError as e:
                key = f"{entry.key}.parameters" if entry else "parameters"
                raise config.error(f"{key}.{e.args[0]}", f"required by {config.merge_method}; nothing applies to {name!r}") from None
        plans.append(TensorPlan(name, params, tuple(model_params)))
    return MergePlan(config, spec, base, inputs, tuple(plans))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load(reader: CheckpointReader, name: str, cast: torch.dtype | None) -> torch.Tensor:
    t = reader.get(name)  # memory of its own: the methods work in place on it
    if cast is not None and t.is_floating_point() and t.dtype != cast:
        return t.to(cast)
    return t


def _flat(reader: CheckpointReader, name: str, numel: int, cast: torch.dtype | None, compute: torch.dtype) -> Flat:
    def read(s: slice) -> torch.Tensor:
        start, stop, _ = s.indices(numel)
        t = reader.get_range(name, start, stop)
        return (t.to(cast) if cast is not None else t).to(compute)

    return Flat(numel, compute, read)


def _all_finite(t: torch.Tensor) -> bool:
    # One cheap reduction: NaN/Inf anywhere make the sum non-finite; a finite sum proves all finite.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _non_finite_error(plan: MergePlan, name: str) -> ValueError:
    for reader in (*([plan.base] if plan.base is not None else []), *plan.inputs):
        t = reader.get(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return ValueError(f"{reader.folder}: tensor {name!r} contains NaN or Inf")
    return ValueError(f"tensor {name!r}: the {plan.config.merge_method} merge produced NaN or Inf (check the weights)")


def merge_tensor(plan: MergePlan, tp: TensorPlan, seed: int = 0, threads: int = 1) -> torch.Tensor:
    """Read one tensor from every model and merge it (`threads` of them on its chunks, for a method
    that streams); the result is in the output dtype."""
    cfg = plan.config
    ref = plan.reference
    out_dtype = cfg.out_dtype or cfg.dtype
    stored = ref.dtype(tp.name)
    if not stored.is_floating_point:
        first = ref.get(tp.name)
        for r in (*plan.inputs, *([plan.base] if plan.base is not None else [])):
            if r is ref:
                continue
            t = r.get(tp.name)
            if t.dtype != first.dtype or not torch.equal(t, first):
                raise ValueError(f"{r.folder}: non-floating tensor {tp.name!r} differs from {ref.folder}; cannot merge it")
        return first
    compute = _compute_dtype(cfg.dtype or stored)
    if plan.spec.streams_base:  # inputs and base read by ranges: none of them is ever whole in memory
        numel = math.prod(ref.shape(tp.name))
        sources = [_flat(r, tp.name, numel, cfg.dtype, compute) for r in plan.inputs]
        base = _flat(plan.base, tp.name, numel, cfg.dtype, compute) if plan.base is not None else None
        task = TensorTask(tp.name, [], None, tp.params, list(tp.model_params), seed, sources=sources, base_source=base,
                          threads=threads)
    else:
        tensors = [_load(r, tp.name, cfg.dtype).to(compute) for r in plan.inputs]
        base = _load(plan.base, tp.name, cfg.dtype).to(compute) if plan.base is not None else None
        task = TensorTask(tp.name, tensors, base, tp.params, list(tp.model_params), seed)
        del tensors, base
    result = MERGE_METHODS.get(cfg.merge_method)(task)
    if not _all_finite(result):
        raise _non_finite_error(plan, tp.name)
    return result.to(out_dtype or stored).view(ref.shape(tp.name))


def _slots(plan: MergePlan) -> list[Slot]:
    """The output layout, known before anything is merged: the shard files are streamed, never buffered."""
    cfg, ref = plan.config, plan.reference
    slots = []
    for tp in plan.tensors:
        stored = ref.dtype(tp.name)
        dtype = (cfg.out_dtype or cfg.dtype or stored) if stored.is_floating_point else stored
        slots.append(Slot(tp.name, tuple(ref.shape(tp.name)), dtype))
    return slots


def _bytes_in_flight(plan: MergePlan, tp: TensorPlan) -> int:
    """Rough memory one tensor's merge holds, in the compute dtype: the result, or every input and the base."""
    numel = math.prod(plan.reference.shape(tp.name))
    if plan.spec.streams_base:
        return 4 * numel  # the result; inputs are read chunk by chunk
    return 4 * numel * (len(plan.inputs) + (plan.base is not None))


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    # Parallelism comes from merging several tensors at once, one thread each: on a shared machine
    # OpenMP's barriers between intra-op threads cost more than the work (measured: 50x on small chunks).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _iter_merged(plan: MergePlan, seed: int, workers: int, budget: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged tensors in plan order, `workers` merging at once, as many queued ahead as fit in `budget` bytes.

    A tensor too large for the budget merges alone, with all `workers` threads on its chunks (the
    embeddings and LM head of a big model: single-threaded, they were a third of the wall time of a
    170M-parameter TIES merge on 2 cores). Queuing ahead lets a worker go on while the oldest
    tensor still merges; the results wait for it within the budget.
    """
    pending: deque[tuple[str, Future, int]] = deque()
    in_flight = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graft-merge")
    try:
        with _one_intra_op_thread():
            for tp in plan.tensors:
                cost = _bytes_in_flight(plan, tp)
                while pending and (in_flight + cost > budget or pending[0][1].done()):
                    name, future, done_cost = pending.popleft()
                    yield name, future.result()
                    in_flight -= done_cost
                alone = cost > budget  # nothing else is pending, nor submitted until it is done
                pending.append((tp.name, pool.submit(merge_tensor, plan, tp, seed, workers if alone else 1), cost))
                in_flight += cost
            while pending:
                name, future, _ = pending.popleft()
                yield name, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finish_side_files(plan: MergePlan, folder: Path) -> None:
    cfg = plan.config
    source = cfg.base_model or plan.reference.folder  # linear ignores the base for math, not for files
    copy_side_files(source, folder)
    tok = cfg.tokenizer_source
    if tok is not None and tok != source:
        for p in folder.iterdir():
            if p.name.startswith(TOKENIZER_FILES):
                p.unlink()
        for p in tok.iterdir():
            if p.is_file() and p.name.startswith(TOKENIZER_FILES):
                shutil.copy2(p, folder / p.name)
    out_dtype = cfg.out_dtype or cfg.dtype
    config_json = folder / "config.json"
    if out_dtype is not None and config_json.is_file():
        hf = json.loads(config_json.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in hf:
                hf[key] = str(out_dtype).removeprefix("torch.")
        config_json.write_text(json.dumps(hf, indent=2) + "\n")
    (folder / "graft_merge.yml").write_text(cfg.source.read_text() if cfg.source.is_file() else "")


def _reporting(merged: Iterator[tuple[str, torch.Tensor]], total: int,
               progress: Callable[[int, int, str], None]) -> Iterator[tuple[str, torch.Tensor]]:
    for done, (name, tensor) in enumerate(merged, 1):
        progress(done, total, name)  # before the yield: the writer stops asking after the last tensor
        yield name, tensor


def execute_plan(plan: MergePlan, out: str | Path, seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 workers: int | None = None, max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES, overwrite: bool = False,
                 progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Stream the planned merge into `out` (atomically: a failure leaves nothing behind; an input is never replaced).

    `workers` tensors (default: one per core) are merged concurrently while what they hold fits in
    `max_inflight_bytes`; a larger tensor merges alone, with `workers` threads on its chunks. Results are
    written in plan order.
    `progress(done, total, name)` is called as each tensor is merged, in plan order (a caller's bar; the library prints nothing).
    """
    workers = max(1, workers or os.cpu_count() or 1)
    cfg = plan.config
    inputs = [m.path for m in cfg.models] + [p for p in (cfg.base_model, cfg.tokenizer_source, cfg.source) if p is not None]
    with atomic_dir(out, overwrite=overwrite, inputs=inputs, kind="merge") as tmp:
        merged = _iter_merged(plan, seed, workers, max_inflight_bytes)
        if progress is not None:
            merged = _reporting(merged, len(plan.tensors), progress)
        stream_shards(tmp, _slots(plan), merged, max_shard_bytes)
        _finish_side_files(plan, tmp)
    return Path(out)


def run_merge(config: MergeConfig | str | Path, out: str | Path, seed: int = 0,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int | None = None) -> Path:
    """Load (if a path), plan and execute a merge; `seed` drives the random methods (DARE)."""
    if not isinstance(config, MergeConfig):
        config = load_merge_config(config)
    return execute_plan(plan_merge(config), out, seed, max_shard_bytes, workers)


__all__ = ["MergeConfigError", "MergePlan", "TensorPlan", "execute_plan", "merge_tensor", "plan_merge", "run_merge"]
