"""A scenario run for real on the launched ranks: inputs, every tiling, golden check, timeline.

``mc2sim run`` is this module: every rank builds its inputs from the scenario (reproducibly,
from the routing seed and its rank), runs the op under each of the scenario's tilings
(``repetitions`` times after a warm-up, recording every task), checks the output of each
tiling against the independent golden of :mod:`mc2sim.golden` under the scenario's precision
standard, and gathers every rank's timeline.
"""

from __future__ import annotations

import socket
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mc2sim import golden, ops
from mc2sim.comm import Communicator
from mc2sim.compare import Verdict, check_all
from mc2sim.kernels import convert_weight_to_int4pack
from mc2sim.routing import route
from mc2sim.scenario import OpName, QuantMode, Scenario
from mc2sim.timeline import Timeline, gather, record

__all__ = ["ExperimentResult", "run_experiment"]

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentResult:
    """What a real run of a scenario produced (the same on every rank)."""

    timeline: Timeline
    """Every rank's tasks of the representative run of each tiling (median total)."""
    runs: dict[str, str]
    """Tiling, in words -> its run label in ``timeline``."""
    baseline: str
    """Run label of the serial plan."""
    verdicts: dict[str, list[Verdict]]
    """Tiling -> every rank's golden verdict (index = rank)."""
    hosts: list[str]
    """Every rank's host name."""

    @property
    def passed(self) -> bool:
        """Whether every rank's output matched its golden under every tiling."""
        return all(v.passed for verdicts in self.verdicts.values() for v in verdicts)


@dataclass
class _Case:
    """One rank's inputs and how to run the op and compute its golden."""

    run: Callable[[object], torch.Tensor]
    expected: np.ndarray
    k: int | None = None


def _uniform(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(dtype)


def _mm_all_reduce_case(scenario: Scenario, comm: Communicator, gen: torch.Generator) -> _Case:
    shape = scenario.effective_shape()
    m, k, n = shape["m"], shape["k"], shape["n"]
    dtype = _TORCH_DTYPES[scenario.dtype]
    quant = scenario.quant
    kwargs: dict[str, Any] = {}
    golden_kwargs: dict[str, Any] = {}
    if quant is QuantMode.W8A8:
        x1 = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        x2 = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
        scale = (torch.rand(n, generator=gen) * 2e-4 + 1e-5).to(torch.bfloat16)
        kwargs = {"dequant_scale": scale}
        out_dtype = torch.bfloat16
        golden_keys = {"dequant_scale": scale}
    else:
        x1 = _uniform(gen, m, k, dtype=dtype, scale=1.0)
        out_dtype = dtype
        golden_keys = {}
        if quant is QuantMode.NONE:
            x2 = _uniform(gen, k, n, dtype=dtype, scale=1.0 / k**0.5)
        else:
            low, high = (-8, 8) if quant is QuantMode.WEIGHT_INT4 else (-128, 128)
            values = torch.randint(low, high, (k, n), generator=gen, dtype=torch.int32)
            x2 = (
                convert_weight_to_int4pack(values)
                if quant is QuantMode.WEIGHT_INT4
                else values.to(torch.int8)
            )
            scale = (torch.rand(n, generator=gen) * 0.02 / k**0.5 + 1e-3).to(dtype)
            offset = _uniform(gen, n, dtype=dtype, scale=1.0)
            kwargs = {"antiquant_scale": scale, "antiquant_offset": offset}
            golden_keys = dict(kwargs)
    everyone = golden.gather_inputs(comm, x1=x1, x2=x2, **golden_keys)
    for key in golden_keys:
        golden_kwargs[key] = everyone[key]
    expected = golden.mm_all_reduce(
        everyone["x1"], everyone["x2"], local_dtype=out_dtype, **golden_kwargs
    )
    return _Case(
        run=lambda tiling: ops.mm_all_reduce(x1, x2, comm, tiling=tiling, **kwargs),  # type: ignore[arg-type]
        expected=expected,
        k=k,
    )


def _moe_case(scenario: Scenario, comm: Communicator, gen: torch.Generator) -> _Case:
    shape = scenario.effective_shape()
    e, h1, n1 = shape["experts_per_rank"], shape["h1"], shape["n1"]
    dtype = _TORCH_DTYPES[scenario.dtype]
    table = route(
        scenario.routing,
        world_size=comm.size,
        experts_per_rank=e,
        tokens_per_rank=shape["tokens"],
        top_k=shape["top_k"],
    )
    combine = scenario.op is OpName.GMM_ALLTOALLV
    direction = "combine" if combine else "dispatch"
    send = table.send_counts(comm.rank, direction)
    recv = table.recv_counts(comm.rank, direction)
    x = _uniform(gen, sum(send), h1, dtype=dtype, scale=1.0)
    w = _uniform(gen, e, h1, n1, dtype=dtype, scale=1.0 / h1**0.5)
    mm_x = mm_w = None
    k = h1
    if scenario.shared_expert:  # the shared expert runs alongside, as in the simulated plans
        h2, n2 = shape["h2"], shape["n2"]
        mm_x = _uniform(gen, shape["tokens"], h2, dtype=dtype, scale=1.0)
        mm_w = _uniform(gen, h2, n2, dtype=dtype, scale=1.0 / h2**0.5)
        k = min(h1, h2)  # one check of both outputs: the stricter bound of the two
    everyone = golden.gather_inputs(comm, x=x, w=w, send=send)
    if combine:
        expected, mm_expected = golden.gmm_alltoallv(
            comm.rank, everyone["x"], everyone["w"], everyone["send"], mm_x=mm_x, mm_weight=mm_w
        )

        def run(tiling: object) -> torch.Tensor:
            y, mm_y = ops.gmm_alltoallv(
                x, w, comm, comm.size, send, recv, mm_x=mm_x, mm_weight=mm_w,
                tiling=tiling,  # type: ignore[arg-type]
            )  # fmt: skip
            return _with_shared(y, mm_y)

    else:
        expected, mm_expected, _ = golden.alltoallv_gmm(
            comm.rank, everyone["x"], w, everyone["send"], mm_x=mm_x, mm_weight=mm_w
        )

        def run(tiling: object) -> torch.Tensor:
            y, mm_y, _ = ops.alltoallv_gmm(
                x, w, comm, comm.size, send, recv, mm_x=mm_x, mm_weight=mm_w,
                tiling=tiling,  # type: ignore[arg-type]
            )  # fmt: skip
            return _with_shared(y, mm_y)

    if mm_expected is not None:
        expected = np.concatenate([expected.ravel(), mm_expected.ravel()])
    return _Case(run=run, expected=expected, k=k)


def _with_shared(y: torch.Tensor, mm_y: torch.Tensor | None) -> torch.Tensor:
    """The routed experts' output, and the shared expert's after it (flattened) if any."""
    if mm_y is None:
        return y
    return torch.cat([y.reshape(-1), mm_y.reshape(-1)])


def _tp_case(scenario: Scenario, comm: Communicator, gen: torch.Generator) -> _Case:
    shape = scenario.effective_shape()
    m, k, n = shape["m"], shape["k"], shape["n"]
    dtype = _TORCH_DTYPES[scenario.dtype]
    x1 = _uniform(gen, m, k, dtype=dtype, scale=1.0)
    x2 = _uniform(gen, k, n, dtype=dtype, scale=1.0 / k**0.5)
    everyone = golden.gather_inputs(comm, x1=x1, x2=x2)
    if scenario.op is OpName.ALL_GATHER_MATMUL:
        expected, _ = golden.all_gather_matmul(everyone["x1"], x2)

        def run(tiling: object) -> torch.Tensor:
            out, _ = ops.all_gather_matmul(x1, x2, comm, comm.size, tiling=tiling)  # type: ignore[arg-type]
            return out

        return _Case(run=run, expected=expected, k=k)
    expected = golden.matmul_reduce_scatter(
        comm.rank, everyone["x1"], everyone["x2"], local_dtype=dtype
    )
    return _Case(
        run=lambda tiling: ops.matmul_reduce_scatter(x1, x2, comm, comm.size, tiling=tiling),  # type: ignore[arg-type]
        expected=expected,
        k=k,
    )


def _ifa_case(scenario: Scenario, comm: Communicator, gen: torch.Generator) -> _Case:
    """This rank's heads of a decode step: a scattered paged cache, lengths within a block."""
    shape = scenario.effective_shape()
    batch, heads, kv_heads = shape["batch"], shape["heads"], shape["kv_heads"]
    dim, kv_len, block = shape["head_dim"], shape["kv_len"], shape["block_size"]
    dtype = _TORCH_DTYPES[scenario.dtype]
    per_seq = -(-kv_len // block)
    blocks = batch * per_seq + 1  # one spare block, never in the table
    table = torch.randperm(blocks, generator=gen)[: batch * per_seq].reshape(batch, per_seq)
    short = torch.randint(0, min(block, kv_len), (batch,), generator=gen)
    lengths = [kv_len - int(s) for s in short]
    query = _uniform(gen, batch, 1, heads * dim, dtype=dtype, scale=1.0)
    key_cache = _uniform(gen, blocks, block, kv_heads * dim, dtype=dtype, scale=1.0)
    value_cache = _uniform(gen, blocks, block, kv_heads * dim, dtype=dtype, scale=1.0)
    table = table.to(torch.int32)
    expected = golden.ifa_paged(
        query, key_cache, value_cache, table, lengths,
        num_heads=heads, num_kv_heads=kv_heads, scale=dim**-0.5, probs_dtype=dtype,
    )  # fmt: skip

    def run(tiling: object) -> torch.Tensor:
        return ops.ifa_decode(
            query, key_cache, value_cache, comm,
            block_table=table, actual_seq_lengths=lengths, num_heads=heads,
            num_key_value_heads=kv_heads, block_size=block, scale_value=dim**-0.5,
            tiling=tiling,  # type: ignore[arg-type]
        )  # fmt: skip

    return _Case(run=run, expected=expected)


def run_experiment(
    scenario: Scenario,
    comm: Communicator,
    *,
    progress: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Run ``scenario`` on every rank of ``comm`` under each of its tilings.

    Args:
        scenario: the study; its per-rank shapes are used as they are, on ``comm.size`` ranks.
        comm: every rank of the job.
        progress: called on every rank with a line per tiling, for the caller to show.

    Returns:
        The representative timelines, golden verdicts and hosts; the same on every rank.
    """
    scenario.world_size(comm.size)  # the scenario's rules at the launched world size
    gen = torch.Generator().manual_seed(1000 * scenario.routing.seed + comm.rank)
    if scenario.is_moe:
        case = _moe_case(scenario, comm, gen)
    elif scenario.op is OpName.MM_ALL_REDUCE:
        case = _mm_all_reduce_case(scenario, comm, gen)
    elif scenario.op is OpName.IFA:
        case = _ifa_case(scenario, comm, gen)
    else:
        case = _tp_case(scenario, comm, gen)
    timelines: list[Timeline] = []
    runs: dict[str, str] = {}
    verdicts: dict[str, list[Verdict]] = {}
    baseline = ""
    for tiling in scenario.tilings:
        output = case.run(tiling)  # warm-up, and the output checked against the golden
        candidates = []
        for _ in range(scenario.repetitions):
            with record() as rec:
                case.run(tiling)
            whole = gather(comm, rec.timeline)
            candidates.append((whole.metrics().total_s, whole))
        candidates.sort(key=lambda pair: pair[0])
        chosen = candidates[len(candidates) // 2][1]
        label = chosen.runs()[0]
        described = label.split("/", 1)[1].rsplit("#", 1)[0]
        runs[described] = label
        if described == "serial":
            baseline = label
        verdicts[described] = check_all(comm, output, case.expected, scenario.standard, k=case.k)
        timelines.append(chosen)
        if progress is not None:
            progress(f"{described}: {statistics.median(t for t, _ in candidates) * 1e3:.2f} ms")
    hosts = comm.allgather_object(socket.gethostname())
    merged = Timeline.merge(*timelines, meta={"scenario": scenario.name, "world_size": comm.size})
    return ExperimentResult(
        timeline=merged, runs=runs, baseline=baseline, verdicts=verdicts, hosts=hosts
    )
