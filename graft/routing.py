"""Routed fusion (methods.md §1.5): θ(x) = θ_base + Σ_i r_i(x) · Δ̂_i, with the packs kept compressed.

Additive fusion adds every skill's delta to every input, so skills interfere with each other and with
the base's general ability. Routed fusion applies each skill's delta only to the inputs a small router
sends to that skill: a prompt of skill i runs on base + Δ̂_i, and a general prompt (class "none") runs
on the untouched base.

- The router is a multinomial logistic regression on one feature of the prompt: the base model's
  hidden state at a chosen layer (default: the last), mean-pooled over the real (unpadded) tokens and
  computed with every delta switched off, so the feature does not depend on the router's own choice.
  The feature pass keeps only that layer's state and stops the forward there: the layers after it
  never run, so routing on a middle layer of an 8B model costs about half a base prefill.
  Classes are the packs' skill names plus "none".
- Routing is decided once per sequence, at prefill (a forward call with no KV cache, or an empty one),
  and kept for the decode steps that follow in `generate`, one weight vector per batch row.
- Deltas are applied on the fly by forward hooks, never densified: an SVD-compressed pack adds
  (x @ V) @ Uᵀ to a linear layer's output; a magnitude-pruned or sparse entry (embeddings, LM head, a sparse adapter) stays a
  sparse matrix, looked up by token id or multiplied sparse × dense; a bias delta is added as is.
  Other vector deltas (norm weights) are applied by re-running that small module with its parameter
  patched, once per distinct routing vector in the batch: exact, and cheap because they are vectors.
- A routed model saves as a self-describing folder (`routed.json`, `router.safetensors`, a copy of
  each pack) and loads only against the base it was made for, like a SkillPack. `routed.json` is
  parsed by its schema (`graft.manifests.RoutedManifest`), covered by a content hash, and its
  checksums cover every other file of the folder; base drift is allowed only by whoever loads it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D
from transformers.utils.output_capturing import OutputRecorder

from graft.loading import CPU_FP32, LoadOptions, load_causal_lm
from graft.artifacts import ArtifactError, manifest_hash, parse_json, payload_checksums, safe_name, validate, verify_payload
from graft.atomic import MARKER, atomic_dir
from graft.checkpoint import CheckpointReader
from graft.fingerprint import DigestCache, base_fingerprint, compare
from graft.grafting import check_pack
from graft.manifests import ROUTED_FORMAT, ROUTED_VERSION, RoutedManifest
from graft.signing import SIGNATURE, sign_folder
from graft.skillpack import SkillPack, SkillPackError

FORMAT, FORMAT_VERSION = ROUTED_FORMAT, ROUTED_VERSION
MANIFEST = "routed.json"
NOT_PAYLOAD = frozenset({MANIFEST, MARKER, SIGNATURE})
NONE = "none"  # the router's class for prompts of no skill: they run on the base alone


# --------------------------------------------------------------------------------------------- router

class _StopForward(Exception):
    """Raised by a capture hook once the routing layer's state is taken, to skip the layers after it."""


def _recorded_layers(inner: nn.Module) -> tuple[list[nn.Module], int]:
    """The modules HF records `hidden_states` from (one per decoder layer, in order) and the output index it takes.

    These are the layers `output_hidden_states=True` reads, so hooking them gives exactly its states.
    """
    spec = getattr(inner, "can_record_outputs", {}).get("hidden_states")
    index = 0
    if isinstance(spec, OutputRecorder):
        if spec.layer_name is not None or spec.class_name is not None or not spec.capture_initial_hidden_state:
            raise ValueError(f"{type(inner).__name__} records hidden states with {spec}; the router's feature "
                             "pass supports recording by decoder-layer class only")
        spec, index = spec.target_class, spec.index
    if not isinstance(spec, type):
        raise ValueError(f"{type(inner).__name__} names no decoder-layer class for its hidden states "
                         f"(can_record_outputs['hidden_states'] = {spec!r}); the router's feature pass needs one")
    layers = [m for m in inner.modules() if isinstance(m, spec)]
    n = getattr(inner.config, "num_hidden_layers", None)
    if len(layers) != n:
        raise ValueError(f"{type(inner).__name__}: found {len(layers)} {spec.__name__} modules but the config has "
                         f"num_hidden_layers={n}")
    return layers, index


@torch.no_grad()
def pooled_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int = -1) -> torch.Tensor:
    """(batch, hidden) float32: a causal LM's hidden state at `layer`, mean-pooled over real tokens.

    Positions are counted from each row's first real token, so a prompt gets the same feature however
    much left padding its batch gave it. `layer` indexes HF's `hidden_states` (0 = embeddings, i = the
    output of decoder layer i - 1, -1 = after the final norm). Only that state is kept, and the forward
    stops once it is computed, so the layers after it never run: the same numbers as reading
    `output_hidden_states=True`, at the cost of the layers up to `layer`.
    """
    inner = model.base_model
    try:
        layers, index = _recorded_layers(inner)
    except ValueError:  # a family that records its hidden states by hand: HF's own reading, every layer run and kept
        return _pooled_from_all_states(model, input_ids, attention_mask, layer)
    if not -len(layers) - 1 <= layer <= len(layers):
        raise ValueError(f"router layer {layer} out of range: the model has hidden states 0..{len(layers)}")
    k = layer % (len(layers) + 1)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    captured: list[torch.Tensor] = []

    def take_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    def take_output(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        captured.append(output[index] if isinstance(output, tuple) else output)
        raise _StopForward

    # HF's last hidden state is the model's output (after the final norm) unless the config unties them
    whole = k == len(layers) and getattr(inner.config, "tie_last_hidden_states", None) is not False
    if whole:
        handle = None
    elif k == 0:
        handle = layers[0].register_forward_pre_hook(take_input, with_kwargs=True)
    else:
        handle = layers[k - 1].register_forward_hook(take_output)
    was_training = model.training
    model.eval()  # no dropout: a prompt's route must not depend on train/eval mode
    try:
        h = inner(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    except _StopForward:
        h = captured[0]
    else:
        if not whole:
            raise RuntimeError(f"{type(inner).__name__}: the forward ran to its end without stopping at hidden state {layer}")
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    h, m = h.to(mask.device, torch.float32), mask.unsqueeze(-1).float()  # a sharded model may hold that layer on another device
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _pooled_from_all_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """`pooled_features` read from `output_hidden_states=True`: the same numbers, for model classes that do not declare
    which decoder layer their hidden states come from (Falcon, Bloom, GPT-J, MPT, CodeGen in transformers 5)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    was_training = model.training
    model.eval()
    try:
        states = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                                  use_cache=False).hidden_states
    finally:
        model.train(was_training)
    if not -len(states) <= layer < len(states):
        raise ValueError(f"router layer {layer} out of range: the model has hidden states 0..{len(states) - 1}")
    h, m = states[layer].to(mask.device, torch.float32), mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class Router(nn.Module):
    """A linear classifier over standardized pooled features; `weights` gives per-class routing weights.

    `hard=True` (the default) routes each prompt wholly to its most likely class (one-hot weights):
    a routed skill prompt then runs on exactly base + Δ̂_i, the model that pack was validated as, and a
    "none" prompt on exactly the base. Softmax weights (`hard=False`) are never exactly zero, so every
    skill would leak a little into every prompt, and a blend of deltas is a model nobody evaluated.
    """

    def __init__(self, classes: Sequence[str], dim: int, layer: int = -1, hard: bool = True) -> None:
        super().__init__()
        if len(set(classes)) != len(classes) or NONE not in classes:
            raise ValueError(f"router classes must be distinct and include {NONE!r}, got {list(classes)}")
        self.classes, self.layer, self.hard = list(classes), layer, hard
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("weight", torch.zeros(len(classes), dim))
        self.register_buffer("bias", torch.zeros(len(classes)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.float() - self.mean) / self.std
        return z @ self.weight.T + self.bias

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, classes): one-hot of the argmax when hard, else softmax probabilities."""
        logits = self.logits(features)
        if self.hard:
            return nn.functional.one_hot(logits.argmax(-1), len(self.classes)).float()
        return logits.softmax(-1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


def train_router(model: nn.Module, tokenizer, prompts_by_class: dict[str, list[str]], layer: int = -1, hard: bool = True,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0, batch_size: int = 64,
                 add_special_tokens: bool = False) -> Router:
    """Fit a Router on the base's pooled features of labelled prompts (deterministic for `seed`).

    `prompts_by_class` maps each skill name, and "none" (general prompts that must stay on the base),
    to example prompts. Full-batch Adam on the class-balanced cross-entropy of standardized features,
    plus an L2 penalty `weight_decay` that keeps the separable case bounded. Prompts are tokenized as
    `graft.evaluation` feeds them (`add_special_tokens=False` by default). If `model` is a RoutedModel,
    its deltas are switched off while features are taken.
    """
    empty = [c for c, ps in prompts_by_class.items() if not ps]
    if NONE not in prompts_by_class or empty:
        raise ValueError(f"prompts_by_class needs non-empty lists for every class and {NONE!r}; "
                         f"got classes {list(prompts_by_class)}, empty: {empty}")
    classes = [c for c in prompts_by_class if c != NONE] + [NONE]
    feats, labels = [], []
    for ci, c in enumerate(classes):
        f = prompt_features(model, tokenizer, prompts_by_class[c], layer, batch_size, add_special_tokens)
        feats.append(f)
        labels.append(torch.full((len(f),), ci))
    x, y = torch.cat(feats), torch.cat(labels)
    router = Router(classes, x.shape[1], layer, hard)
    router.mean.copy_(x.mean(0))
    router.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
    z = (x - router.mean) / router.std
    w = torch.zeros(len(classes), x.shape[1], requires_grad=True)  # zero start: a convex problem, solved the same way each run
    b = torch.zeros(len(classes), requires_grad=True)
    balance = len(y) / (len(classes) * torch.bincount(y, minlength=len(classes)).float())
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(z @ w.T + b, y, weight=balance) + weight_decay * w.pow(2).sum()
            loss.backward()
            opt.step()
    router.weight.copy_(w.detach())
    router.bias.copy_(b.detach())
    return router


def prompt_features(model: nn.Module, tokenizer, prompts: list[str], layer: int = -1, batch_size: int = 64,
                    add_special_tokens: bool = False) -> torch.Tensor:
    """Pooled base features of `prompts` (batched, left-padded), with deltas off for a RoutedModel."""
    inner = model.model if isinstance(model, RoutedModel) else model
    device = next(inner.parameters()).device
    out = []
    with model.deltas_off() if isinstance(model, RoutedModel) else nullcontext():
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            out.append(pooled_features(inner, enc["input_ids"].to(device), enc["attention_mask"].to(device), layer).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------ delta application

@dataclass
class _Part:
    """One pack's delta on one module, applied as `contrib(x)` added to the module's output."""

    pack: int
    kind: str  # lowrank | sparse | dense | bias | embed_lowrank | embed_sparse | embed_dense | patch
    tensors: dict[str, torch.Tensor]
    param: str = "weight"
    _cache: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> dict:
        """The tensors on `device`: dense ones in `dtype`, sparse ones built once in float32."""
        key = (device, dtype)
        if key not in self._cache:
            t = {k: v.to(device) for k, v in self.tensors.items()}
            if self.kind in ("sparse", "embed_sparse"):
                m = torch.sparse_coo_tensor(t["index"], t["value"].float(), tuple(t["shape"].tolist()), check_invariants=False)
                with warnings.catch_warnings():  # CSR is "beta" in torch; it is the fast layout for sparse × dense
                    warnings.simplefilter("ignore")
                    t = {"m": m.coalesce() if self.kind == "embed_sparse" else m.to_sparse_csr()}
            else:
                t = {k: v.to(dtype) for k, v in t.items()}
            self._cache[key] = t
        return self._cache[key]

    def contrib(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        t = self.on(x.device, out_dtype)
        if self.kind == "lowrank":
            return (x.to(out_dtype) @ t["left"]) @ t["right"].T
        if self.kind == "dense":
            return x.to(out_dtype) @ t["m"]
        if self.kind == "bias":
            return t["b"].expand(*x.shape[:-1], -1)
        if self.kind == "sparse":
            flat = x.reshape(-1, x.shape[-1]).float()
            return (t["m"] @ flat.T).T.reshape(*x.shape[:-1], -1).to(out_dtype)
        if self.kind == "embed_lowrank":
            return t["u"][x] @ t["v"].T
        if self.kind == "embed_dense":
            return t["d"][x]
        if self.kind == "embed_sparse":
            return torch.index_select(t["m"], 0, x.reshape(-1)).to_dense().view(*x.shape, -1).to(out_dtype)
        raise AssertionError(self.kind)


def _parts_for(pack: SkillPack, index: int, key: str, module: nn.Module, param: str) -> _Part:
    """How pack `index`'s delta for tensor `key` is applied to `module`'s parameter `param` (see the module docstring)."""
    entry = pack.manifest["tensors"][key]
    scheme, shape = entry["scheme"], list(entry["shape"])
    own = getattr(module, param, None)
    if not isinstance(own, torch.Tensor) or list(own.shape) != shape:
        got = list(own.shape) if isinstance(own, torch.Tensor) else None
        raise SkillPackError(f"{pack.folder or pack.name}: tensor {key!r} of shape {shape} does not fit the model's {got}")
    linear, conv1d = isinstance(module, nn.Linear), isinstance(module, Conv1D)
    if (linear or conv1d) and param == "bias":
        return _Part(index, "bias", {"b": pack.delta(key)}, param)
    if (linear or conv1d) and param == "weight":
        if scheme == "svd_quant":
            u, v = pack.factors(key)  # ΔW = U Vᵀ; Linear stores W as (out, in), Conv1D as (in, out)
            left, right = (v, u) if linear else (u, v)
            return _Part(index, "lowrank", {"left": left, "right": right}, param)
        if (positions := pack.positions(key)) is not None:
            rows, cols = shape
            idx, value = positions
            ij = torch.stack([idx // cols, idx % cols])
            m_shape = [rows, cols] if linear else [cols, rows]  # m maps input to output: out = m @ x
            return _Part(index, "sparse", {"index": ij if linear else ij.flip(0), "value": value,
                                           "shape": torch.tensor(m_shape)}, param)
        d = pack.delta(key)
        return _Part(index, "dense", {"m": d.T if linear else d}, param)
    if isinstance(module, nn.Embedding) and param == "weight":
        if scheme == "svd_quant":
            u, v = pack.factors(key)
            return _Part(index, "embed_lowrank", {"u": u, "v": v}, param)
        if (positions := pack.positions(key)) is not None:
            idx, value = positions
            return _Part(index, "embed_sparse", {"index": torch.stack([idx // shape[1], idx % shape[1]]),
                                                 "value": value, "shape": torch.tensor(shape)}, param)
        return _Part(index, "embed_dense", {"d": pack.delta(key)}, param)
    return _Part(index, "patch", {"d": pack.delta(key)}, param)  # norms etc.: re-run the module, parameter patched


# -------------------------------------------------------------------------------------- routed model

class RoutedModel(nn.Module):
    """An HF causal LM with SkillPacks applied per input, as weighted by a Router; see the module docstring.

    `model` must be the base loaded from `base_path` (packs are checked against that folder's
    fingerprint). Use it like the model: `routed(**enc)`, `routed.generate(**enc, ...)`, `.eval()`.
    """

    def __init__(self, model: nn.Module, packs: Sequence[SkillPack], router: Router, base_path: str | Path,
                 allow_base_drift: bool = False, digest_cache: DigestCache | None = None) -> None:
        super().__init__()
        self.model, self.packs, self.router = model, list(packs), router
        self.base_path, self.allow_base_drift = Path(base_path), allow_base_drift
        names = [p.name for p in self.packs]
        if len(set(names)) != len(names) or NONE in names:
            raise ValueError(f"pack skill names must be distinct and not {NONE!r}: {names}")
        if sorted(router.classes) != sorted([*names, NONE]):
            raise ValueError(f"router classes {router.classes} do not match the packs {names} plus {NONE!r}")
        reader = CheckpointReader(self.base_path)
        self.base_drift = {p.name: check_pack(p, reader, allow_base_drift, digest_cache) for p in self.packs}
        self.fingerprint = base_fingerprint(reader, sorted({k for p in self.packs for k in p.keys()}), digest_cache)
        self.register_buffer("_pack_class", torch.tensor([router.classes.index(n) for n in names], dtype=torch.long),
                             persistent=False)
        self._routing: torch.Tensor | None = None  # (batch, packs), set at prefill
        self._enabled, self._rerunning = True, set()  # ids of modules being re-run with patched parameters
        self._handles = [model.register_forward_pre_hook(self._route_hook, with_kwargs=True)]
        aliases: dict[int, list[str]] = {}  # tied weights (e.g. GPT-2's wte and lm_head) get the delta at every use
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        by_module: dict[str, list[_Part]] = {}
        for i, pack in enumerate(self.packs):
            for key in pack.keys():
                try:
                    names = aliases[id(model.get_parameter(key))]
                except AttributeError:
                    raise SkillPackError(f"{pack.folder or pack.name}: tensor {key!r} is not a parameter of the model") from None
                for name in names:
                    mod_name, param = name.rsplit(".", 1)
                    by_module.setdefault(mod_name, []).append(_parts_for(pack, i, key, model.get_submodule(mod_name), param))
        for mod_name, parts in by_module.items():
            self._handles.append(model.get_submodule(mod_name).register_forward_hook(self._delta_hook(parts)))
        self.train(model.training)  # mirror the wrapped model's mode (nn.Module starts in training mode)

    # --- routing
    @torch.no_grad()
    def _features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        with self.deltas_off():
            feats = pooled_features(self.model, input_ids, attention_mask, self.router.layer)
        return feats.to(self.router.mean.device)

    def weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, packs): the weight of each pack (in pack order) for each prompt; all zero means base only."""
        return self.router.weights(self._features(input_ids, attention_mask))[:, self._pack_class.to(self.router.mean.device)]

    def decisions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """The router's most likely class (a skill name or "none") for each prompt."""
        return [self.router.classes[i] for i in self.router.logits(self._features(input_ids, attention_mask)).argmax(-1).tolist()]

    @contextmanager
    def deltas_off(self) -> Iterator[None]:
        """Run the bare base inside this block (hooks pass through, routing untouched)."""
        was, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = was

    def _route_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._enabled:
            return None
        past = kwargs.get("past_key_values")
        if past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0:  # a decode step: keep the prefill's routing
            if self._routing is None:
                raise RuntimeError("RoutedModel: decode step with no routing; start with a prefill call on input_ids")
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("RoutedModel routes on input_ids; a call with inputs_embeds alone cannot be routed")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._routing = self.weights(ids, mask).to(ids.device)
        return None

    def _delta_hook(self, parts: list[_Part]) -> Callable:
        patches = [p for p in parts if p.kind == "patch"]
        adds = [p for p in parts if p.kind != "patch"]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            w = self._routing
            if not self._enabled or id(module) in self._rerunning or w is None:
                return None
            x = args[0]
            if x.shape[0] == 1 and w.shape[0] > 1:  # an input shared by the batch (e.g. GPT-2's position ids): give each row its own
                x, output = x.expand(w.shape[0], *x.shape[1:]), output.expand(w.shape[0], *output.shape[1:])
                args = (x, *args[1:])
            if x.shape[0] != w.shape[0]:
                raise RuntimeError(f"RoutedModel: routed a batch of {w.shape[0]} but a module got {x.shape[0]} rows")
            if patches:
                output = self._patched(module, args, output, patches, w)
            for part in adds:
                col = w[:, part.pack]
                rows = col.nonzero().flatten()
                if len(rows) == 0:  # hard routing: rows of other skills cost nothing
                    continue
                scale = col[rows].to(output.dtype).view(-1, *[1] * (output.dim() - 1))
                output = output.index_add(0, rows, scale * part.contrib(x[rows], output.dtype))
            return output

        return hook

    def _patched(self, module: nn.Module, args: tuple, output: torch.Tensor, patches: list[_Part], w: torch.Tensor) -> torch.Tensor:
        """Re-run `module` with its parameters patched, once per distinct routing vector of these packs."""
        sub = w[:, sorted({p.pack for p in patches})]
        vectors, group = torch.unique(sub, dim=0, return_inverse=True)
        for g, vec in enumerate(vectors):
            if not vec.any():
                continue
            rows = (group == g).nonzero().flatten()
            params = {}
            for p in patches:
                base = params.get(p.param, getattr(module, p.param))
                params[p.param] = base + w[rows[0], p.pack].to(base.dtype) * p.on(base.device, base.dtype)["d"]
            self._rerunning.add(id(module))
            try:
                out_rows = torch.func.functional_call(module, params, tuple(a[rows] if torch.is_tensor(a) else a for a in args))
            finally:
                self._rerunning.discard(id(module))
            output = output.index_copy(0, rows, out_rows)
        return output

    # --- the wrapped model's interface
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`model.generate`; each row is routed once, at prefill, and keeps its deltas while decoding.

        With `use_cache=False` every step is a prefill, so rows are re-routed on prompt + text so far;
        with chunked prefill (`prefill_chunk_size`) the route is decided on the first chunk.
        """
        return self.model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def tie_weights(self, *args, **kwargs) -> None:
        """As the base model's (tools that take any HF model, such as lm-eval's HFLM, call it)."""
        self.model.tie_weights(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the bare base model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model

    # --- folders
    def save(self, folder: str | Path, overwrite: bool = False, sign_with: str | Path | None = None) -> Path:
        """Write routed.json, router.safetensors and packs/<skill>/ into `folder`, atomically; signed with the
        private key file `sign_with` when given (`graft.signing`)."""
        inputs = [self.base_path, *(p.folder for p in self.packs if p.folder is not None)]
        with atomic_dir(folder, overwrite=overwrite, inputs=inputs, kind="routed") as tmp:
            self.write_into(tmp)
            if sign_with is not None:
                sign_folder(tmp, sign_with)
        return Path(folder)

    def write_into(self, folder: Path) -> None:
        """Write the routed model's files into an existing folder (the caller owns atomicity)."""
        for pack in self.packs:
            safe_name(pack.name)
        save_file(self.router.state_tensors(), str(folder / "router.safetensors"), metadata={"format": FORMAT})
        for pack in self.packs:
            (folder / "packs" / pack.name).mkdir(parents=True)
            pack.write_into(folder / "packs" / pack.name)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base": str(self.base_path.resolve()),
                "base_fingerprint": self.fingerprint, "packs": [p.name for p in self.packs],
                "router": {"classes": self.router.classes, "layer": self.router.layer, "hard": self.router.hard},
                "checksums": payload_checksums(folder, NOT_PAYLOAD)}
        meta["content_hash"] = manifest_hash(meta)
        validate(meta, RoutedManifest, str(folder / MANIFEST))
        (folder / MANIFEST).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | Path, base: str | Path | None = None, allow_base_drift: bool = False,
             digest_cache: DigestCache | None = None, options: LoadOptions = CPU_FP32) -> "RoutedModel":
        """Load a saved routed model on `base` (default: the base path it was saved with); safetensors only.

        Refused, with a SkillPackError naming the file and field, when routed.json fails its schema or
        content hash, a file fails its checksum or is not listed, the base is not the one the folder was
        made for, or its weights drifted and the caller did not allow it (the folder never does).
        The base is opened as `options` say (dtype, device; `graft.loading`).
        """
        folder = Path(folder)
        meta = read_routed_manifest(folder)
        base = Path(base) if base is not None else Path(meta.base)
        problems, drifted = compare(meta.base_fingerprint.model_dump(), CheckpointReader(base), digest_cache)
        if problems:
            raise SkillPackError(f"{folder}: does not fit base {base}: {problems[0]}")
        if drifted and not allow_base_drift:
            raise SkillPackError(f"{folder}: base {base} differs from the base the routed model was made for "
                                 f"(tensor {drifted[0]!r} changed); allow base drift to load it anyway")
        packs = [SkillPack.load(folder / "packs" / name) for name in meta.packs]
        state = load_file(str(folder / "router.safetensors"))
        r = meta.router
        if set(state) != {"mean", "std", "weight", "bias"} or state["weight"].shape != (len(r.classes), state["mean"].shape[0]):
            raise SkillPackError(f"{folder / 'router.safetensors'}: does not hold a router for classes {r.classes}")
        router = Router(r.classes, state["mean"].shape[0], r.layer, r.hard)
        router.load_state_dict(state)
        model = load_causal_lm(base, options)
        model.eval()
        return cls(model, packs, router, base, allow_base_drift, digest_cache)


def read_routed_manifest(folder: Path) -> RoutedManifest:
    """routed.json, checked by schema, content hash and the checksums of every other file in the folder."""
    mpath = folder / MANIFEST
    try:
        meta = parse_json(mpath, RoutedManifest, "routed model")
        if meta.content_hash != manifest_hash(json.loads(mpath.read_bytes())):
            raise ArtifactError(f"{mpath}: content_hash: does not match the manifest (the manifest was modified)")
        verify_payload(folder, meta.checksums, NOT_PAYLOAD, mpath)
    except ArtifactError as e:
        raise SkillPackError(str(e)) from None
    return meta


def build_routed(base_path: str | Path, packs: Sequence[SkillPack | str | Path], prompts_by_class: dict[str, list[str]],
                 layer: int = -1, hard: bool = True, allow_base_drift: bool = False, steps: int = 300, seed: int = 0,
                 tokenizer: str | Path | None = None, digest_cache: DigestCache | None = None,
                 options: LoadOptions = CPU_FP32) -> RoutedModel:
    """Load the base (as `options` say), train a router on `prompts_by_class` (skill names + "none") and wrap it with `packs`.

    `tokenizer` is the folder of the base's tokenizer when it is not saved with the base.
    """
    packs = [p if isinstance(p, SkillPack) else SkillPack.load(p) for p in packs]
    reader = CheckpointReader(base_path)
    for pack in packs:  # refuse a misfit before spending time on the router
        check_pack(pack, reader, allow_base_drift, digest_cache)
    model = load_causal_lm(base_path, options)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer or base_path))
    tok.padding_side = "left"
    router = train_router(model, tok, prompts_by_class, layer=layer, hard=hard, steps=steps, seed=seed)
    return RoutedModel(model, packs, router, base_path, allow_base_drift, digest_cache)


def is_routed(folder: str | Path) -> bool:
    """Whether `folder` holds a saved routed model (rather than a plain checkpoint)."""
    return (Path(folder) / "routed.json").is_file()
