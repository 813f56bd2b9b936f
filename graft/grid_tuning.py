"""Grid tuning: fit a packed skill's quantization grids to the expert's answers, at no cost in bytes.

A SkillPack stores each low-rank factor column as integer codes on an fp16 grid (min, step). After
packing, the codes stay as they are and only the grids move: each column's step is scaled by exp(a)
and its min shifted by b·step, with (a, b) fitted by Adam so that the base plus the pack predicts the
expert's next-token distribution on the answer tokens of calibration data (KL(expert ‖ packed), the
loss the expert was trained on, not a per-layer proxy). Two numbers per column move, so this cannot
overfit a few hundred examples, and the pack's bytes are unchanged. Matrices of `nn.Linear` layers are
tuned; everything else in the pack is applied as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from graft.skillpack import Band, SkillPack, svd_bands

DEFAULT_STEPS = 40
DEFAULT_LR = 3e-3  # 1e-2 measured unstable on the testbed (KL back up after 20+ passes)


@dataclass
class _Column:
    """One stored band of one factor, its codes fixed, with the two learnable numbers per column."""

    band: Band
    log_scale: torch.Tensor  # (n,) learnable
    shift: torch.Tensor  # (n,) learnable, in units of step

    def values(self) -> torch.Tensor:
        step, lo = self.band.step.float(), self.band.lo.float()
        return self.band.codes.float() * (step * self.log_scale.exp()) + lo + step * self.shift

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            step, lo = self.band.step.float(), self.band.lo.float()
            return (lo + step * self.shift).half(), (step * self.log_scale.exp()).half()


class _Tunable:
    """The svd_quant entries of a pack as functions of their learnable grids: ΔW = U Vᵀ."""

    def __init__(self, pack: SkillPack, keys: Sequence[str]) -> None:
        self.pack, self.keys = pack, list(keys)
        self.columns: dict[str, list[_Column]] = {}
        for key in self.keys:
            stored = pack.stored(key)
            if "s" in stored:
                raise ValueError(f"{pack.folder or pack.name}: tensor {key!r} is in SkillPack format v1 (σ stored apart); "
                                 "repack it to tune")
            self.columns[key] = [_Column(band, torch.zeros(band.codes.shape[1], requires_grad=True),
                                         torch.zeros(band.codes.shape[1], requires_grad=True))
                                 for band in svd_bands(stored, pack.manifest["tensors"][key])]

    def parameters(self) -> list[torch.Tensor]:
        return [p for cols in self.columns.values() for c in cols for p in (c.log_scale, c.shift)]

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        cols = self.columns[key]
        u = torch.cat([c.values() for c in cols if c.band.factor == "u"], dim=1)
        v = torch.cat([c.values() for c in cols if c.band.factor == "v"], dim=1)
        return u, v

    def tuned_pack(self) -> SkillPack:
        tensors = dict(self.pack.tensors)
        for key, cols in self.columns.items():
            for c in cols:
                tensors[f"{key}::{c.band.prefix}.min"], tensors[f"{key}::{c.band.prefix}.step"] = c.grid()
        manifest = dict(self.pack.manifest)
        manifest.pop("checksums", None)
        manifest.pop("content_hash", None)
        return SkillPack(manifest, tensors)


def _answer_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions whose next token is an answer token (labels other than -100)."""
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    return mask


def _inputs(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@contextmanager
def _grafted(model: nn.Module, pack: SkillPack, tunable: _Tunable) -> Iterator[None]:
    """The base `model` with the pack's fixed parts added to its weights and the tunable ones hooked on; undone after."""
    modules = dict(model.named_modules())
    saved, handles = {}, []
    try:
        with torch.no_grad():
            for key in pack.keys():
                if key not in tunable.keys:
                    param = model.get_parameter(key)
                    saved[key] = param.detach().clone()
                    param += pack.delta(key).to(param.device, param.dtype).view_as(param)
        for key in tunable.keys:
            def hook(module, args, output, key=key):
                u, v = (f.to(output.device) for f in tunable.factors(key))
                return output + ((args[0].to(u.dtype) @ v) @ u.T).to(output.dtype)
            handles.append(modules[key.removesuffix(".weight")].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for key, value in saved.items():
                model.get_parameter(key).copy_(value)


def tune_grids(pack: SkillPack, model: nn.Module, expert: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
               steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> SkillPack:
    """A copy of `pack` whose svd_quant grids are fitted so base + pack matches `expert` on the answer tokens of `batches`.

    `model` is the base the pack was made for (its weights are restored afterwards); `expert` the model the
    pack compresses (e.g. base + LoRA adapter); `batches` collated calibration data with `labels` marking
    answers (`graft.data.collated_batches`). `steps` passes over the batches; the grids of the pass with
    the least KL are kept (the untouched ones if none is better). The new pack's manifest records the
    KL before and after under "grid_tuning". The expert's distributions at every answer position are held
    in host memory (positions × vocabulary floats); each model runs on its own device.
    """
    modules = dict(model.named_modules())
    keys = [k for k in pack.keys() if pack.manifest["tensors"][k]["scheme"] == "svd_quant"
            and pack.manifest["tensors"][k]["rank"] > 0 and isinstance(modules.get(k.removesuffix(".weight")), nn.Linear)]
    tunable = _Tunable(pack, keys)
    batches = [b for b in batches if _answer_positions(b).any()]
    if not batches:
        raise ValueError("grid tuning needs calibration batches with answer tokens (labels other than -100)")
    expert.eval()
    with torch.no_grad():
        targets = []
        for b in batches:
            logits = expert(**_inputs(b, expert)).logits.float()
            targets.append(torch.log_softmax(logits[_answer_positions(b).to(logits.device)], -1).cpu())
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)

    def kl(batch: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:  # KL(expert ‖ model) per answer token
        logits = model(**_inputs(batch, model)).logits.float()
        student = torch.log_softmax(logits[_answer_positions(batch).to(logits.device)], -1)
        target = target.to(student.device)
        return (target.exp() * (target - student)).sum(-1).mean()

    def mean_kl() -> float:
        with torch.no_grad():
            return sum(float(kl(b, t)) for b, t in zip(batches, targets)) / len(batches)

    params = tunable.parameters()
    opt = torch.optim.Adam(params, lr=lr)
    try:
        with _grafted(model, pack, tunable):
            before = best = mean_kl()
            kept = [p.detach().clone() for p in params]
            for _ in tqdm(range(steps), desc=f"grid tuning {pack.name}", disable=None, leave=False):
                for batch, target in zip(batches, targets):
                    opt.zero_grad()
                    kl(batch, target).backward()
                    opt.step()
                now = mean_kl()
                if now < best:  # keep the best pass: Adam can wander off late
                    best, kept = now, [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p.copy_(value)
        tuned = tunable.tuned_pack()
        saved = _Tunable(tuned, keys)  # the grids as stored (fp16), for an honest "after"
        with _grafted(model, tuned, saved):
            after = mean_kl()
    finally:
        for p, requires in frozen:
            p.requires_grad_(requires)
        model.train(was_training)
    tuned.manifest["grid_tuning"] = {"steps": steps, "lr": lr, "batches": len(batches), "matrices": len(keys),
                                     "kl_before": before, "kl_after": after}
    return tuned
