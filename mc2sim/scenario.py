"""Scenario files: one study (op, shapes, quantisation, routing, tilings, topology) per YAML file.

A :class:`Scenario` says which fused operator to run or simulate, on how many ranks, with which
shapes, dtype, quantisation and MoE routing, which tilings to compare (always including the
``serial`` baseline), on which topology, under which precision standard and how many times.
Scenarios live in YAML files (``scenarios/*.yaml``, format in ``docs/SCENARIOS.md``);
:func:`load` reads one, applies the CLI's ``--set key=value`` overrides and names the file and
the key in every error; :func:`dump` writes one back; :func:`builtin` opens a shipped one::

    sc = mc2sim.scenario.builtin("mixtral_8x7b_combine", ["scale=small", "ranks=4"])
    sc.effective_shape()      # the small shape: {'tokens': 64, 'top_k': 2, ...}
    sc.world_size(None)       # 4

Every rule a scenario can break before anything runs (the operators' shape limits, the
expert-parallel limits, quantisation only with MatmulAllReduce) is checked when the
:class:`Scenario` is built, for the full shape and for the ``small`` one.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mc2sim import topology as _topology
from mc2sim._compat import StrEnum
from mc2sim._yaml import read_yaml, shipped_dir, shipped_file, shipped_names, write_yaml
from mc2sim.compare import Standard
from mc2sim.errors import ParamInvalidError
from mc2sim.limits import BSK, WORLD, Lifted, LimitProfile, Policy
from mc2sim.model.heterogeneity import STRAGGLER_KEYS, Straggler, check_stragglers
from mc2sim.ops.registry import SPECS, spec_of
from mc2sim.ops.spec import DTYPES, OpName, OpSpec, QuantMode
from mc2sim.routing import RoutingConfig, RoutingKind, check_hot, check_matrix
from mc2sim.schedule.tiling import tiling_of

__all__ = [
    "DTYPES",
    "MAX_WORLD",
    "SHAPE_KEYS",
    "OpName",
    "QuantMode",
    "Scale",
    "Scenario",
    "builtin",
    "dump",
    "list_builtin",
    "load",
    "scenarios_dir",
]

# OpName, QuantMode and DTYPES are the op registry's (mc2sim.ops.spec); re-exported here.


class Scale(StrEnum):
    """Which shape a scenario runs with.

    Glossary:
        ``full``: the realistic ``shape`` of the file.
        ``small``: ``shape`` with the ``small`` values put in (same ratios, seconds on a CPU).
    """

    FULL = "full"
    SMALL = "small"


MAX_WORLD = WORLD.high
"""The largest world size a scenario plans for (``ranks``, ``--ranks``): no machine mc2sim
models is larger, and an op's own limits (MoE's expert count) may bound it lower."""

MAX_REPETITIONS = 10_000
"""The most timed repetitions per tiling a scenario asks for: more would keep a run going
for days (a large call takes seconds a repetition) with nothing more to learn."""

SHAPE_KEYS: Mapping[OpName, tuple[tuple[str, ...], tuple[str, ...]]] = MappingProxyType(
    {op: (spec.required, spec.optional) for op, spec in SPECS.items()}
)
"""Per op, the (required, optional) keys of ``shape`` (from the op registry)."""


# ----------------------------------------------------------------------------- checks


def _integer(param: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamInvalidError(param, value, "must be an integer")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ParamInvalidError(param, value, f"must be {'in ' if high else ''}{bound}")
    return value


def _choice(param: str, value: object, enum: type[StrEnum]) -> Any:
    """Return ``enum(value)``, listing the allowed values otherwise."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(v.value) for v in enum)
        raise ParamInvalidError(param, value, f"must be one of {allowed}") from None


def _shape_table(param: str, value: object) -> dict[str, int]:
    """Return ``value`` as a dict of str to int, refusing anything else."""
    if not isinstance(value, Mapping):
        raise ParamInvalidError(param, value, "must be a mapping of dimension name to integer")
    table: dict[str, int] = {}
    for key, dim in value.items():
        if not isinstance(key, str):
            raise ParamInvalidError(f"{param}.{key}", dim, "key must be a string")
        table[key] = _integer(f"{param}.{key}", dim, 1)
    return table


# ----------------------------------------------------------------------------- dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    """One study: an operator, its shapes and options, the tilings to compare, where to run it."""

    name: str
    """Identifier, e.g. ``"mixtral_8x7b_combine"`` (a shipped file's name is its file name)."""

    description: str
    """What the scenario models, citing the model configuration its sizes come from."""

    op: OpName
    """The fused operator (an ``OpName`` or its string value)."""

    ranks: int
    """World size ``simulate`` uses by default (``run`` uses the launched world size), >= 1."""

    dtype: str
    """Activation and output dtype: ``"float16"`` or ``"bfloat16"``."""

    shape: Mapping[str, int]
    """Full-size dimensions; keys per op in ``SHAPE_KEYS`` (``m, k, n`` for the TP ops;
    ``tokens`` (BS per rank), ``top_k``, ``experts_per_rank``, ``h1``, ``n1`` and optionally
    ``h2`` and ``n2`` (shared expert) for the MoE ops; ``batch``, ``heads``, ``kv_heads``
    (per rank), ``head_dim``, ``kv_len``, ``block_size`` for ``ifa``). Stored read-only."""

    quant: QuantMode = QuantMode.NONE
    """Quantisation; anything but ``none`` needs ``op == mm_all_reduce``."""

    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """How tokens pick experts (MoE ops only; the TP ops keep the default)."""

    tilings: tuple[str | int | None, ...] = ("serial", "hardware")
    """Tilings to compare, each valid for ``tiling_of`` (``None`` is stored as
    ``"hardware"``); must include ``"serial"``, the baseline; no two alike."""

    topology: str = "atlas_a2_8p"
    """A shipped topology name (``mc2sim.topology.list_builtin()``) or a topology file path;
    the simulator resizes it to the world size."""

    standard: Standard = Standard.ALLCLOSE
    """Precision standard the outputs are checked with (a ``Standard`` or its value)."""

    repetitions: int = 5
    """Timed repetitions per tiling, in [1, MAX_REPETITIONS]."""

    small: Mapping[str, int] = field(default_factory=dict)
    """Shape values used with ``scale == "small"`` (a subset of ``shape``'s keys, each no
    larger than the full value, chosen to keep the shape's ratios). Stored read-only."""

    scale: Scale = Scale.FULL
    """Which shape :meth:`effective_shape` gives: ``"full"`` or ``"small"``."""

    limits: LimitProfile = LimitProfile.STRICT
    """Which limits the study keeps (:mod:`mc2sim.limits`): ``"strict"`` (every limit, the
    default; ``run`` needs it) or ``"what-if"`` (hardware limits lifted: ``simulate`` and
    ``sweep`` with ``--what-if``; semantic limits still apply)."""

    stragglers: Mapping[int, Straggler] = field(default_factory=dict)
    """Ranks unlike the others (simulation only): rank -> its compute slowdown, link
    bandwidth fraction and late start (:class:`~mc2sim.model.heterogeneity.Straggler`);
    each rank must be < the world size. Stored read-only, in rank order."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ParamInvalidError("name", self.name, "must be a non-empty string")
        if not isinstance(self.description, str):
            raise ParamInvalidError("description", self.description, "must be a string")
        op: OpName = _choice("op", self.op, OpName)
        object.__setattr__(self, "op", op)
        _integer("ranks", self.ranks, 1, MAX_WORLD)
        if self.dtype not in DTYPES:
            allowed = ", ".join(repr(d) for d in DTYPES)
            raise ParamInvalidError("dtype", self.dtype, f"must be one of {allowed}")
        quant: QuantMode = _choice("quant", self.quant, QuantMode)
        object.__setattr__(self, "quant", quant)
        object.__setattr__(self, "scale", _choice("scale", self.scale, Scale))
        object.__setattr__(self, "standard", _choice("standard", self.standard, Standard))
        object.__setattr__(self, "limits", _choice("limits", self.limits, LimitProfile))
        _integer("repetitions", self.repetitions, 1, MAX_REPETITIONS)
        policy = Policy(profile=self.limits)

        spec = spec_of(op)
        shape = spec.check_shape(_shape_table("shape", self.shape), "shape", policy)
        spec.check_world(shape, self.ranks, "ranks", policy)
        small = _shape_table("small", self.small)
        for key, value in small.items():
            if key not in shape:
                raise ParamInvalidError(
                    f"small.{key}", value, "must be a key of shape; allowed: " + ", ".join(shape)
                )
            if value > shape[key]:
                raise ParamInvalidError(
                    f"small.{key}", value, f"must be <= the full shape's {key} ({shape[key]})"
                )
        small_shape = spec.check_shape({**shape, **small}, "small", policy)
        spec.check_world(small_shape, self.ranks, "ranks", policy)
        object.__setattr__(self, "shape", MappingProxyType(shape))
        object.__setattr__(
            self, "small", MappingProxyType({k: small[k] for k in spec.keys if k in small})
        )
        spec.check_quant(quant, shape, "shape")
        spec.check_quant(quant, small_shape, "small")

        if not isinstance(self.routing, RoutingConfig):
            raise ParamInvalidError("routing", self.routing, "must be a RoutingConfig")
        if not spec.routed and self.routing != RoutingConfig():
            raise ParamInvalidError(
                "routing", self.routing, f"only applies to ops that route tokens, not {op}"
            )
        if spec.routed and self.routing.kind is RoutingKind.HOT:
            total = shape["experts_per_rank"] * self.ranks
            if self.routing.hot_experts > total:
                raise ParamInvalidError(
                    "routing.hot_experts",
                    self.routing.hot_experts,
                    f"must be <= the number of experts ({total})",
                )

        object.__setattr__(self, "tilings", self._checked_tilings())
        stragglers = check_stragglers("stragglers", self.stragglers)
        object.__setattr__(self, "stragglers", MappingProxyType(stragglers))
        self.check_stragglers(self.ranks, "ranks")

        if not isinstance(self.topology, str) or not self.topology.strip():
            raise ParamInvalidError("topology", self.topology, "must be a non-empty string")
        known = _topology.list_builtin()
        if self.topology not in known and not Path(self.topology).is_file():
            raise ParamInvalidError(
                "topology",
                self.topology,
                "must be a shipped topology or a topology file; shipped: " + ", ".join(known),
            )

    def _checked_tilings(self) -> tuple[str | int | None, ...]:
        """Return the tilings, checked, with ``None`` spelled ``"hardware"``."""
        if not isinstance(self.tilings, (tuple, list)) or not self.tilings:
            raise ParamInvalidError(
                "tilings", self.tilings, "must be a non-empty list, e.g. [serial, hardware, 4]"
            )
        seen: dict[object, int] = {}
        result: list[str | int | None] = []
        for i, spec in enumerate(self.tilings):
            spec = "hardware" if spec is None else spec
            if isinstance(spec, bool) or not isinstance(spec, (str, int)):
                raise ParamInvalidError(
                    f"tilings[{i}]", spec, "must be 'serial', 'hardware' or an int in [1, 16]"
                )
            try:
                tiling = tiling_of(spec)
            except ParamInvalidError:
                raise ParamInvalidError(
                    f"tilings[{i}]", spec, "must be 'serial', 'hardware' or an int in [1, 16]"
                ) from None
            if tiling in seen:
                raise ParamInvalidError(f"tilings[{i}]", spec, f"repeats tilings[{seen[tiling]}]")
            seen[tiling] = i
            result.append(spec)
        if "serial" not in result:
            raise ParamInvalidError(
                "tilings", result, "must include 'serial' (the baseline of every study)"
            )
        return tuple(result)

    def __hash__(self) -> int:
        return hash(
            (
                self.name,
                self.op,
                self.ranks,
                self.dtype,
                tuple(self.shape.items()),
                self.quant,
                self.routing,
                self.tilings,
                self.topology,
                self.standard,
                self.repetitions,
                tuple(self.small.items()),
                self.scale,
            )
        )

    @property
    def spec(self) -> OpSpec:
        """The op's spec in the registry (shape keys, limits, plans, real-run case)."""
        return spec_of(self.op)

    @property
    def routed(self) -> bool:
        """Whether the op routes tokens to experts (the scenario's ``routing`` applies)."""
        return self.spec.routed

    def effective_shape(self) -> dict[str, int]:
        """Return the shape to run: ``shape``, with ``small`` put in when ``scale == "small"``.

        Returns:
            A new dict of dimension name to size.

        """
        if self.scale is Scale.SMALL:
            return {**self.shape, **self.small}
        return dict(self.shape)

    def world_size(self, override: int | None = None, param: str = "world_size") -> int:
        """Return the world size to use: ``override`` if given, else ``ranks``; checked.

        Args:
            override: the launched world size (``run``), ``--ranks``, or ``None``.
            param: what errors call ``override`` (``"--ranks"`` for the command line).

        Returns:
            The world size.

        Raises:
            ParamInvalidError: ``override`` is not an int in [1, :data:`MAX_WORLD`] or breaks
                a rule tying the shape to the world size (``experts_per_rank * world_size
                <= 256``, ``top_k <= experts_per_rank * world_size``, ``m`` a multiple of the
                world size for matmul_reduce_scatter); or a ``matrix`` routing's file cannot
                be read or holds a matrix of another shape (``routing.matrix_path``).

        """
        world = self.ranks
        if override is not None:
            world = _integer(param, override, 1, MAX_WORLD)
            self.spec.check_world(self.effective_shape(), world, param, Policy(profile=self.limits))
            self.check_stragglers(world, param)
        if self.routed and self.routing.kind is RoutingKind.HOT:
            shape = self.effective_shape()
            try:  # here, before any draw: the error then names the scenario's key
                check_hot(
                    self.routing,
                    top_k=shape["top_k"],
                    num_experts=world * shape["experts_per_rank"],
                )
            except ParamInvalidError as err:
                raise ParamInvalidError(f"routing.{err.param}", err.value, err.rule) from None
        if self.routed and self.routing.kind is RoutingKind.MATRIX:
            experts = self.effective_shape()["experts_per_rank"]
            try:
                matrix = check_matrix(self.routing, world_size=world, experts_per_rank=experts)
            except ParamInvalidError as err:
                raise ParamInvalidError(f"routing.{err.param}", err.value, err.rule) from None
            rows = matrix.sum(axis=1)  # each rank's tokens * top_k: at most BSK's, as a shape's
            busiest = int(rows.argmax())
            if rows[busiest] > BSK.high:
                BSK.check(
                    f"routing.matrix_path row {busiest}: tokens * top_k",
                    int(rows[busiest]),
                    Policy(profile=self.limits),
                )
        return world

    def check_stragglers(self, world: int, param: str) -> None:
        """Refuse a straggler whose rank is not below ``world`` (errors name ``param``).

        Raises:
            ParamInvalidError: a straggler's rank >= ``world``.
        """
        for rank in self.stragglers:
            if rank >= world:
                raise ParamInvalidError(
                    f"stragglers.{rank}", rank, f"must be a rank < {param} ({world})"
                )

    def lifted(self, world: int | None = None, param: str = "world_size") -> tuple[Lifted, ...]:
        """The hardware limits this study goes past at ``world`` ranks (what-if only).

        Args:
            world: the world size (None: ``ranks``), already accepted by :meth:`world_size`.
            param: what the world size is called (``"--ranks"`` for the command line).

        Returns:
            One :class:`~mc2sim.limits.Lifted` per limit lifted (the first place it was met),
            in the order the checks meet them; empty under ``strict``.
        """
        policy = Policy(profile=self.limits)
        if self.limits is LimitProfile.STRICT:
            return ()
        spec = self.spec
        world_param = "ranks" if world is None else param
        ranks = self.ranks if world is None else world
        for where, shape in (("shape", dict(self.shape)), ("small", {**self.shape, **self.small})):
            spec.check_shape(shape, where, policy)
            spec.check_world(shape, ranks, world_param, policy)
        return tuple(policy.lifted)

    def with_overrides(self, overrides: Sequence[str]) -> Scenario:
        """Return this scenario with ``--set key=value`` overrides applied (see :func:`load`).

        Args:
            overrides: ``"key=value"`` strings.

        Returns:
            The new scenario; errors name ``--set KEY``.

        """
        data = _as_data(self)
        touched = _apply_overrides(data, overrides)
        return _Reader(f"scenario {self.name}", touched, None).scenario(data)

    def load_topology(self) -> _topology.Topology:
        """Return the :class:`~mc2sim.topology.Topology` this scenario names (not resized)."""
        return _topology.resolve(self.topology)


# ----------------------------------------------------------------------------- overrides

_TOP_KEYS = (
    "name",
    "description",
    "op",
    "ranks",
    "dtype",
    "shape",
    "quant",
    "routing",
    "tilings",
    "topology",
    "standard",
    "repetitions",
    "small",
    "scale",
    "limits",
    "stragglers",
)
_REQUIRED = ("name", "description", "op", "ranks", "dtype", "shape", "tilings", "topology")
_ROUTING_KEYS = ("kind", "seed", "skew", "hot_fraction", "hot_experts", "matrix_path")
_INT_KEYS = ("ranks", "repetitions", "routing.seed", "routing.hot_experts")
_FLOAT_KEYS = ("routing.skew", "routing.hot_fraction")
_ALL_OVERRIDE_KEYS = (
    *(k for k in _TOP_KEYS if k not in ("shape", "routing", "small", "stragglers")),
    "shape.KEY",
    "small.KEY",
    *(f"routing.{k}" for k in _ROUTING_KEYS),
    *(f"stragglers.RANK.{k}" for k in STRAGGLER_KEYS),
)
_SECTIONS = ("shape", "routing", "small", "stragglers")
_INT_TEXT = re.compile(r"[+-]?\d[\d_]*")


def _parse_int(key: str, text: str) -> int:
    if not _INT_TEXT.fullmatch(text.strip()):
        raise ParamInvalidError(f"--set {key}", text, "must be an integer")
    return int(text.strip().replace("_", ""))


def _parse_float(key: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ParamInvalidError(f"--set {key}", text, "must be a number") from None


def _parse_tiling(text: str) -> str | int | None:
    item = text.strip()
    if _INT_TEXT.fullmatch(item):
        return int(item)
    if item.lower() in ("none", "null", "~"):
        return None
    return item


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> tuple[str, ...]:
    """Apply ``key=value`` strings to the raw scenario ``data``; return the keys set."""
    if isinstance(overrides, str):
        raise ParamInvalidError("--set", overrides, "overrides must be a list of KEY=VALUE")
    touched: list[str] = []
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ParamInvalidError("--set", text, "must be KEY=VALUE, e.g. ranks=8")
        key, _, raw = text.partition("=")
        key = key.strip()
        parts = key.split(".")
        value: Any
        if len(parts) == 3 and parts[0] == "stragglers" and parts[2] in STRAGGLER_KEYS:
            rank = _parse_int(key, parts[1])
            if rank < 0:
                raise ParamInvalidError(f"--set {key}", raw, "the rank must be an int >= 0")
            section = data.get("stragglers") or {}
            if not isinstance(section, dict):
                raise ParamInvalidError(
                    f"--set {key}", raw, "the file's stragglers is not a mapping"
                )
            entry = section.get(rank) or {}
            if not isinstance(entry, dict):
                raise ParamInvalidError(
                    f"--set {key}", raw, f"the file's stragglers.{rank} is not a mapping"
                )
            data["stragglers"] = {**section, rank: {**entry, parts[2]: _parse_float(key, raw)}}
            touched.append(key)
            continue
        if len(parts) == 2 and parts[0] in ("shape", "small") and parts[1]:
            value = _parse_int(key, raw)
        elif len(parts) == 2 and parts[0] == "routing" and parts[1] in _ROUTING_KEYS:
            if key in _INT_KEYS:
                value = _parse_int(key, raw)
            elif key in _FLOAT_KEYS:
                value = _parse_float(key, raw)
            else:
                value = raw.strip()
        elif len(parts) == 1 and key in _TOP_KEYS and key not in _SECTIONS:
            if key in _INT_KEYS:
                value = _parse_int(key, raw)
            elif key == "tilings":
                value = [_parse_tiling(t) for t in raw.split(",") if t.strip()]
            else:
                value = raw.strip()
        else:
            raise ParamInvalidError(
                f"--set {key}", raw, "unknown key; allowed: " + ", ".join(_ALL_OVERRIDE_KEYS)
            )
        if len(parts) == 2:
            section = data.get(parts[0])
            if section is None:
                section = {}
            if not isinstance(section, dict):
                raise ParamInvalidError(
                    f"--set {key}", raw, f"the file's {parts[0]} is not a mapping"
                )
            data[parts[0]] = {**section, parts[1]: value}
        else:
            data[key] = value
        touched.append(key)
    return tuple(touched)


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Turns parsed YAML (plus overrides) into a :class:`Scenario`, naming file and key."""

    def __init__(self, file: str, overridden: tuple[str, ...], base: Path | None) -> None:
        self.file = file
        self.overridden = overridden
        self.base = base

    def error(self, where: str, value: object, rule: str) -> ParamInvalidError:
        """Return an error naming the file and ``where`` (``--set KEY`` if overridden).

        ``where`` is named as ``--set KEY`` when it is that key or lies inside it (the value is
        the override's); an override deeper inside ``where`` (``--set stragglers.9.compute``
        for a rule on ``stragglers.9``) is named after the rule instead.
        """
        for key in self.overridden:
            if where == key or where.startswith(key + "."):
                return ParamInvalidError(f"{self.file}: --set {key}", value, rule)
        if self.overridden:
            rule += " (with " + ", ".join(f"--set {k}" for k in self.overridden) + ")"
        return ParamInvalidError(f"{self.file}: {where}" if where else self.file, value, rule)

    def mapping(
        self, value: object, where: str, keys: tuple[str, ...], required: tuple[str, ...]
    ) -> dict[str, Any]:
        """Check ``value`` is a mapping with only allowed keys and every required one."""
        if not isinstance(value, dict):
            raise self.error(where, value, f"must be a mapping with keys {', '.join(keys)}")
        prefix = f"{where}." if where else ""
        for key in value:
            if key not in keys:
                raise self.error(
                    f"{prefix}{key}", value[key], f"unknown key; allowed: {', '.join(keys)}"
                )
        for key in required:
            if key not in value:
                raise self.error(f"{prefix}{key}", None, "is required")
        return value

    def resolve(self, path: str) -> str:
        """Return ``path``, or the file next to the scenario file when that one exists."""
        if self.base is not None and not os.path.isabs(path):
            candidate = self.base / path
            if candidate.is_file():
                return str(candidate)
        return path

    def scenario(self, data: object) -> Scenario:
        top = self.mapping(data, "", _TOP_KEYS, _REQUIRED)
        op = top["op"]
        kwargs: dict[str, Any] = {k: v for k, v in top.items() if k != "routing"}
        if "tilings" in top:
            tilings = top["tilings"]
            if not isinstance(tilings, list):
                raise self.error("tilings", tilings, "must be a list, e.g. [serial, hardware, 4]")
            kwargs["tilings"] = tuple(tilings)
        for key in ("shape", "small", "stragglers"):
            if key in top and top[key] is None:
                kwargs[key] = {}
        topo = top.get("topology")
        if isinstance(topo, str) and topo not in _topology.list_builtin():
            kwargs["topology"] = self.resolve(topo)
        if "routing" in top:
            if op in SPECS and not SPECS[op].routed:
                raise self.error(
                    "routing", top["routing"], f"only applies to ops that route tokens, not {op}"
                )
            kwargs["routing"] = self.routing(top["routing"])
        try:
            scenario = Scenario(**kwargs)
        except ParamInvalidError as err:
            raise self.error(err.param, err.value, err.rule) from None
        self.check_not_shadowed(scenario)
        return scenario

    def check_not_shadowed(self, scenario: Scenario) -> None:
        """Refuse ``--set shape.KEY`` that a small run would silently ignore.

        At ``scale=small`` the ``small`` values replace the ``shape`` ones they name, so such
        an override changes nothing that runs (unless ``small.KEY`` is set alongside it).
        """
        if scenario.scale is not Scale.SMALL:
            return
        for key in self.overridden:
            section, _, name = key.partition(".")
            if (
                section == "shape"
                and name in scenario.small
                and f"small.{name}" not in self.overridden
            ):
                raise self.error(
                    key,
                    scenario.shape[name],
                    f"has no effect at scale=small, where small.{name}={scenario.small[name]} "
                    f"replaces it: set small.{name} instead (or scale=full)",
                )

    def routing(self, data: object) -> RoutingConfig:
        block = dict(self.mapping(data, "routing", _ROUTING_KEYS, ()))
        if isinstance(block.get("matrix_path"), str):
            block["matrix_path"] = self.resolve(block["matrix_path"])
        try:
            return RoutingConfig(**block)
        except ParamInvalidError as err:
            raise self.error(f"routing.{err.param}", err.value, err.rule) from None


def _read_yaml(file: str) -> object:
    """Return a fresh copy of the parsed YAML of ``file``; errors name the file.

    The file is parsed once while it is unchanged: a sweep reads its scenario once per point.
    """
    try:
        stat = os.stat(file)
    except OSError:
        return read_yaml(file)
    return copy.deepcopy(_parsed(file, stat.st_mtime_ns, stat.st_size, stat.st_ino))


@functools.lru_cache(maxsize=16)
def _parsed(file: str, mtime_ns: int, size: int, inode: int) -> object:
    """The parsed YAML of ``file`` as it was at ``mtime_ns``, ``size`` and ``inode``."""
    del mtime_ns, size, inode  # the cache key: a changed file is parsed again
    return read_yaml(file)


def load(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Scenario:
    """Read a scenario file and apply ``--set`` overrides.

    Args:
        path: a YAML file in the format of ``docs/SCENARIOS.md``.
        overrides: the CLI's ``--set key=value`` strings: a top-level key (``ranks=8``,
            ``scale=small``, ``repetitions=3``, ``topology=atlas_a2_8p``,
            ``tilings=serial,4,hardware``) or a dotted one (``shape.m=128``,
            ``small.tokens=32``, ``routing.kind=zipf``, ``routing.skew=1.5``). Values are read
            as the field needs: integers, numbers, comma lists or text.

    Returns:
        The :class:`Scenario`.

    Raises:
        ParamInvalidError: the file cannot be read, is not YAML, has an unknown or missing
            key, or breaks a rule; the message names the file and the key, e.g.
            ``"scenarios/x.yaml: routing.kind='zipfian': must be one of 'balanced', ..."``,
            or ``--set KEY`` when an override is at fault.

    """
    file = os.fspath(path)
    data = _read_yaml(file)
    touched: tuple[str, ...] = ()
    if overrides:
        if not isinstance(data, dict):
            raise ParamInvalidError(file, data, "must be a mapping of scenario keys")
        try:
            touched = _apply_overrides(data, overrides)
        except ParamInvalidError as err:
            raise ParamInvalidError(f"{file}: {err.param}", err.value, err.rule) from None
    return _Reader(file, touched, Path(file).resolve().parent).scenario(data)


# ----------------------------------------------------------------------------- writing


def _as_data(scenario: Scenario) -> dict[str, Any]:
    """Return the plain-data form of ``scenario``, in the file format's key order."""
    data: dict[str, Any] = {
        "name": scenario.name,
        "description": scenario.description,
        "op": scenario.op.value,
        "ranks": scenario.ranks,
        "dtype": scenario.dtype,
        "shape": dict(scenario.shape),
        "quant": scenario.quant.value,
    }
    if scenario.routed:
        r = scenario.routing
        routing: dict[str, Any] = {"kind": r.kind.value, "seed": r.seed, "skew": r.skew}
        routing.update(hot_fraction=r.hot_fraction, hot_experts=r.hot_experts)
        if r.matrix_path is not None:
            routing["matrix_path"] = r.matrix_path
        data["routing"] = routing
    data.update(
        tilings=list(scenario.tilings),
        topology=scenario.topology,
        standard=scenario.standard.value,
        repetitions=scenario.repetitions,
        small=dict(scenario.small),
        scale=scenario.scale.value,
    )
    if scenario.limits is not LimitProfile.STRICT:
        data["limits"] = scenario.limits.value
    if scenario.stragglers:
        data["stragglers"] = {
            rank: {k: getattr(s, k) for k in STRAGGLER_KEYS}
            for rank, s in scenario.stragglers.items()
        }
    return data


def dump(scenario: Scenario, path: str | os.PathLike[str]) -> None:
    """Write ``scenario`` as YAML that :func:`load` reads back equal.

    The text goes to a temporary file in the same folder, then is moved into place.

    Args:
        scenario: the scenario to write.
        path: the destination file; its folder must exist.

    """
    if not isinstance(scenario, Scenario):
        raise ParamInvalidError("scenario", scenario, "must be a Scenario")
    write_yaml(_as_data(scenario), path)


# ----------------------------------------------------------------------------- shipped files


def scenarios_dir() -> Path:
    """Return the shipped ``scenarios`` folder: the repository's, or an install's copy."""
    return shipped_dir("scenarios")


def list_builtin() -> list[str]:
    """Return the names of the shipped scenarios (the ``*.yaml`` files of :func:`scenarios_dir`).

    Returns:
        Sorted names without the ``.yaml`` suffix; empty when the folder is absent.

    """
    return shipped_names(scenarios_dir())


def builtin(name: str, overrides: Sequence[str] = ()) -> Scenario:
    """Load the shipped scenario ``scenarios/<name>.yaml``.

    Args:
        name: one of :func:`list_builtin`, e.g. ``"llama70b_tp8_prefill"``.
        overrides: ``--set`` strings, as for :func:`load`.

    Returns:
        The loaded :class:`Scenario`.

    Raises:
        ParamInvalidError: no shipped scenario has that name, or :func:`load` fails.

    """
    return load(shipped_file(scenarios_dir(), name, "scenario"), overrides)
