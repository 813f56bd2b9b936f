"""The merge-method contract: parameter specs, the per-tensor task, and the `MERGE_METHODS` registry.

A merge method is one function `fn(task) -> Tensor` registered by name with `merge_method(...)`,
which also attaches a `MethodSpec` (its parameters, their defaults and scopes, and how it treats the
base model). The config loader validates a YAML against the spec; the executor builds one
`TensorTask` per tensor name and calls the function. Parameter names, defaults and scopes follow
mergekit 0.1.5 so that its YAML files carry over unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from typing import Any

import torch
from pydantic import TypeAdapter

from graft.registry import Registry

MISSING: Any = object()


@cache
def _adapter(kind: type) -> TypeAdapter:
    return TypeAdapter(kind)


class Scope(str, Enum):
    """Where a parameter's value comes from (mergekit's parameter scopes)."""

    SHARED = "shared"  # one value per tensor, from the global `parameters:` only
    INPUT = "input"  # one value per input model, base model included
    NON_BASE = "non_base"  # one value per input model other than the base


class BasePolicy(str, Enum):
    """How a method treats `base_model`."""

    REQUIRED = "required"  # deltas are taken against the base (task arithmetic family, slerp)
    IGNORED = "ignored"  # the base, if named, is just one more input (linear)


@dataclass(frozen=True)
class Param:
    """One named parameter of a merge method: its scalar type, default and scope."""

    name: str
    type: type
    default: Any = MISSING
    scope: Scope = Scope.SHARED

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def validate(self, value: Any) -> Any:
        """Coerce a YAML scalar the way mergekit does (e.g. '1e-3' → 0.001 for floats)."""
        return _adapter(self.type).validate_python(value)


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method needs: its parameters, its base-model policy and how many inputs."""

    name: str
    params: tuple[Param, ...]
    base: BasePolicy = BasePolicy.REQUIRED
    min_inputs: int = 1
    max_inputs: int | None = None
    streams_base: bool = False  # reads inputs and base by element ranges (`TensorTask.inputs`, `base_flat`), never whole

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class Flat:
    """A tensor seen flat and read by element ranges: a view of memory, or fresh reads from a file."""

    numel: int
    dtype: torch.dtype
    read: Callable[[slice], torch.Tensor]

    @staticmethod
    def of(t: torch.Tensor) -> "Flat":
        v = t.view(-1)
        return Flat(v.numel(), v.dtype, v.__getitem__)


@dataclass
class TensorTask:
    """Everything one merge-method call sees for one tensor name.

    `tensors` are the inputs other than the base when the method takes deltas against a base, and all
    inputs (in config order) otherwise. `model_params[i]` holds the per-input parameters of `tensors[i]`.
    Tensors are already in the compute dtype and may be modified in place: the executor owns them.
    For a method registered with `streams_base`, the executor leaves `tensors` empty and `base` None
    and gives `sources` and `base_source` instead: the inputs and the base as `Flat` readers of fresh
    element ranges in the compute dtype, so no input of a large tensor is ever held whole.
    """

    name: str
    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    seed: int = 0
    sources: list[Flat] | None = None
    base_source: Flat | None = None
    threads: int = 1  # threads that may work on this tensor's chunks at once (the executor's choice)
    _generators: dict[int, torch.Generator] = field(default_factory=dict, repr=False)

    @property
    def inputs(self) -> list[Flat]:
        """The inputs as flat readers, in memory or streamed."""
        return self.sources if self.sources is not None else [Flat.of(t) for t in self.tensors]

    @property
    def base_flat(self) -> Flat | None:
        """The base as a flat reader, in memory or streamed (None without a base)."""
        return Flat.of(self.base) if self.base is not None else self.base_source

    def generator(self, index: int) -> torch.Generator:
        """A generator for input `index` seeded from (seed, tensor name, index): the draw for one tensor
        does not depend on which tensors were merged before it, so results are order-independent."""
        if index not in self._generators:
            key = zlib.crc32(f"{self.seed}:{self.name}:{index}".encode())
            self._generators[index] = torch.Generator().manual_seed(key)
        return self._generators[index]


MergeFn = Callable[[TensorTask], torch.Tensor]
MERGE_METHODS: Registry[MergeFn] = Registry("merge method")


def merge_method(name: str, params: tuple[Param, ...], base: BasePolicy = BasePolicy.REQUIRED,
                 min_inputs: int = 1, max_inputs: int | None = None, streams_base: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` under `name` in `MERGE_METHODS` and attach its `MethodSpec` as `fn.spec`."""

    def add(fn: MergeFn) -> MergeFn:
        fn.spec = MethodSpec(name, params, base, min_inputs, max_inputs, streams_base)  # type: ignore[attr-defined]
        return MERGE_METHODS.register(name)(fn)

    return add


def spec_of(name: str) -> MethodSpec:
    """The spec of a registered method; an unknown name lists the known ones."""
    return MERGE_METHODS.get(name).spec  # type: ignore[attr-defined]


def task_arithmetic_params(normalize: bool, rescale: bool) -> tuple[Param, ...]:
    """The parameters shared by the task-arithmetic family, with the method's own defaults."""
    return (
        Param("weight", float, scope=Scope.NON_BASE),
        Param("density", float, 1.0, Scope.NON_BASE),
        Param("normalize", bool, normalize),
        Param("rescale", bool, rescale),
        Param("lambda", float, 1.0),
        Param("int8_mask", bool, False),  # a memory option in mergekit; the result is the same either way
    )
