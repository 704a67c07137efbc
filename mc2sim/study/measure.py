"""The measured side of a study: a scenario run for real on the launched ranks.

One measurement protocol serves ``mc2sim run``, ``calibrate`` and ``validate-model``
(:func:`measure_rounds`): every call of a set is run once per round, in interleaved rounds
shuffled the same way on every rank, after a warm-up round. Each rank builds its inputs from
the op's spec in the registry (reproducibly, from the routing seed and its rank), so a real
run and its simulated plans describe the same work.

:func:`measure_study` is ``mc2sim run``: every tiling of the scenario is golden-checked under
its precision standard, then timed in ``repetitions`` rounds; the representative run of each
tiling is the one at the lower quartile of the spans (:data:`mc2sim.model.accuracy.QUIET_QUANTILE`:
the machine's other users only add time to a round). After the rounds, rank 0 times the
machine's speed probe while the others sleep (:func:`probe_tflops`), which a fitted topology
also holds (``Device.probe_tflops``): a comparison with a simulation says when the machine
ran at another pace than its fit, and can run the model at the run's speed.
"""

from __future__ import annotations

import functools
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mc2sim.comm import Communicator, describe_device, transport
from mc2sim.compare import Verdict, check_all
from mc2sim.errors import ParamInvalidError
from mc2sim.model.accuracy import QUIET_QUANTILE
from mc2sim.ops.spec import RealCase, TilingSpec
from mc2sim.scenario import Scenario
from mc2sim.schedule import Plan
from mc2sim.study.simulate import plans_for
from mc2sim.timeline import RunKey, Timeline, gather, record

__all__ = [
    "Case",
    "MeasuredStudy",
    "alone_median",
    "asleep_until_done",
    "cases_of",
    "matmul_tflops",
    "measure_rounds",
    "measure_study",
    "probe_tflops",
    "real_case",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One op call of a scenario under one tiling: how to run it, and every rank's plan."""

    name: str
    """The scenario and the tiling, in words."""
    tiling: str
    """The tiling in words (as the plans describe it)."""
    run: Callable[[], object]
    """Runs the op on this rank (every rank calls it)."""
    plans: tuple[Plan, ...]
    """Every rank's plan of the call, index = rank."""


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredStudy:
    """What a real run of a scenario produced (the same on every rank)."""

    timeline: Timeline
    """Every rank's tasks of the representative run of each tiling (the round at the lower
    quartile of the spans)."""
    runs: dict[str, RunKey]
    """Tiling, in words (or the name of a call timed alongside) -> its run in ``timeline``."""
    baseline: RunKey
    """The serial plan's run."""
    verdicts: dict[str, list[Verdict]]
    """Tiling -> every rank's golden verdict (index = rank)."""
    hosts: list[str]
    """Every rank's host name."""
    devices: list[str]
    """Every rank's device, in words (:func:`mc2sim.comm.describe_device`)."""
    backend: str
    """How the collectives travelled (:func:`mc2sim.comm.transport`)."""
    probe_tflops: float | None = None
    """The machine's speed after the rounds (:func:`probe_tflops`), TFLOP/s; None on an
    accelerator (its fits are not made by ``mc2sim calibrate``)."""

    def passed_tiling(self, tiling: str) -> bool:
        """Whether every rank's output matched its golden under ``tiling``."""
        return all(v.passed for v in self.verdicts[tiling])

    @property
    def passed(self) -> bool:
        """Whether every rank's output matched its golden under every tiling."""
        return all(v.passed for verdicts in self.verdicts.values() for v in verdicts)


def real_case(
    scenario: Scenario, comm: Communicator, device: torch.device | None = None
) -> RealCase:
    """This rank's inputs, op call and golden of ``scenario`` (the op's spec builds them).

    Args:
        scenario: the study; checked against the launched world size first.
        comm: every rank of the job.
        device: where the op runs (None: the CPU).

    Returns:
        The case; its inputs are drawn from a generator seeded by the routing seed and rank
        (on the host, so every device gets the same numbers) and placed on ``device``.
    """
    scenario.world_size(comm.size)  # the scenario's rules at the launched world size
    gen = torch.Generator().manual_seed(1000 * scenario.routing.seed + comm.rank)
    return scenario.spec.real_case(scenario, comm, gen, device)


def cases_of(
    scenario: Scenario,
    comm: Communicator,
    tilings: Sequence[TilingSpec] | None = None,
    *,
    real: RealCase | None = None,
) -> list[Case]:
    """One :class:`Case` per tiling of ``scenario`` on the ranks of ``comm``.

    Args:
        scenario: the study.
        comm: every rank of the job.
        tilings: the tilings to make cases of (default: the scenario's).
        real: the scenario's real case, if already built (else it is built here).

    Returns:
        The cases, in the order of ``tilings``.
    """
    real = real if real is not None else real_case(scenario, comm)
    cases = []
    for tiling in scenario.tilings if tilings is None else tilings:
        plans = plans_for(scenario, comm.size, tiling)
        described = plans[0].tiling
        cases.append(
            Case(
                name=f"{scenario.name} {described}",
                tiling=described,
                run=functools.partial(real.run, tiling),
                plans=tuple(plans[r] for r in range(comm.size)),
            )
        )
    return cases


def measure_rounds(
    comm: Communicator,
    runs: Sequence[Callable[[], object]],
    *,
    reps: int,
    progress: Callable[[int, int, str], None] | None = None,
    groups: Sequence[Communicator] | None = None,
) -> list[list[Timeline]]:
    """Each run's recorded timeline (every rank's) in ``reps`` interleaved rounds.

    Each round calls every run once, so a slow spell of a shared machine lands on all of them
    alike instead of on the few that ran during it, in a new shuffled order (seeded: the same
    on every rank), so no run always follows the same one (a call after another of other
    shapes can pay for the caches and the allocator); a first round warms up and is not kept.

    Args:
        comm: every rank of the job (each calls every run).
        runs: the calls.
        reps: rounds kept after the warm-up.
        progress: called after each round with ``(round, rounds, label)``.
        groups: for each run, the group its ranks run it in (a split of ``comm``: every
            group runs its own copy at once) and its timeline is gathered over; default
            ``comm`` for all.

    Returns:
        For every run, its ``reps`` timelines gathered over its group; the same on every
        rank of the group.

    Raises:
        ParamInvalidError: ``reps`` below 1, or not one group per run.
    """
    if reps < 1:
        raise ParamInvalidError("reps", reps, "must be >= 1 (rounds measured after the warm-up)")
    over = [comm] * len(runs) if groups is None else list(groups)
    if len(over) != len(runs):
        raise ParamInvalidError("groups", len(over), f"must give one group per run ({len(runs)})")
    kept: list[list[Timeline]] = [[] for _ in runs]
    rounds = reps + 1
    shuffle = np.random.default_rng(0)  # the same order on every rank
    for rnd in range(rounds):
        for i in shuffle.permutation(len(runs)):
            with record() as rec:
                runs[i]()
            if rnd > 0:
                kept[i].append(gather(over[i], rec.timeline))
        if progress is not None:
            progress(rnd, rounds, "warm-up" if rnd == 0 else f"round {rnd}/{reps}")
    return kept


def measure_study(
    scenario: Scenario,
    comm: Communicator,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    alongside: Mapping[str, Callable[[], object]] | None = None,
    real: RealCase | None = None,
    device: torch.device | None = None,
    timing: Callable[[list[Callable[[], object]]], list[list[Timeline]]] | None = None,
) -> MeasuredStudy:
    """Run ``scenario`` on every rank of ``comm`` under each of its tilings.

    Each tiling's output is checked against the golden first (that call also warms it up),
    then every tiling is timed in ``scenario.repetitions`` interleaved rounds
    (:func:`measure_rounds`), together with the calls of ``alongside``, or in the rounds
    ``timing`` gives them.

    Args:
        scenario: the study; its per-rank shapes are used as they are, on ``comm.size`` ranks.
        comm: every rank of the job.
        progress: called on every rank after each round, as :func:`measure_rounds` does.
        alongside: more calls to time in the same rounds, by the name their run gets
            (``mc2sim check``'s implementation); each records its own tasks of that name.
        real: the scenario's real case, if already built on ``device`` (else it is built
            here).
        device: this rank's device (None: the CPU); on an accelerator the executor runs
            each plan on its compute and comm streams and times it by device events.
        timing: how the calls are timed instead: given them, each one's timeline in every
            round kept (``run --calibrate`` times them in a calibration's rounds, so the run
            and its fit see the same state of the machine).

    Returns:
        The representative timelines (the round at the spans' lower quartile), golden
        verdicts, hosts and devices; the same on every rank.
    """
    where = torch.device("cpu") if device is None else device
    real = real if real is not None else real_case(scenario, comm, where)
    cases = cases_of(scenario, comm, real=real)
    extra = dict(alongside or {})
    verdicts: dict[str, list[Verdict]] = {}
    for case, tiling in zip(cases, scenario.tilings, strict=True):
        output = real.run(tiling)
        verdicts[case.tiling] = check_all(comm, output, real.expected, scenario.standard, k=real.k)
    calls = [c.run for c in cases] + list(extra.values())
    rounds = (
        measure_rounds(comm, calls, reps=scenario.repetitions, progress=progress)
        if timing is None
        else timing(calls)
    )
    timelines: list[Timeline] = []
    runs: dict[str, RunKey] = {}
    for name, mine in zip([c.tiling for c in cases] + list(extra), rounds, strict=True):
        ordered = sorted(mine, key=lambda t: t.metrics().total_s)
        chosen = ordered[round(QUIET_QUANTILE * (len(ordered) - 1))]
        runs[name] = chosen.runs()[0]
        timelines.append(chosen)
    hosts = comm.allgather_object(socket.gethostname())
    devices = comm.allgather_object(describe_device(where))
    merged = Timeline.merge(*timelines, meta={"scenario": scenario.name, "world_size": comm.size})
    return MeasuredStudy(
        timeline=merged, runs=runs, baseline=runs["serial"], verdicts=verdicts, hosts=hosts,
        devices=devices, backend=transport(comm, where),
        probe_tflops=probe_tflops(comm) if where.type == "cpu" else None,
    )  # fmt: skip


PROBE_N = 1024
"""The speed probe's matmul: float32, ``PROBE_N`` cubed (2.1 GFLOP: about 10 ms on a core
here)."""

PROBE_REPS = 15
"""Timed calls of the probe (after one warm-up); their median counts. The fit's probe and a
run's are the same measurement (median of 5 read 0.106 to 0.137 TFLOP/s in one minute here,
of 15 0.134 to 0.140)."""


def alone_median(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn`` on this rank alone (after one warm-up call)."""
    fn()
    times = []
    for _ in range(max(reps, 3)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def asleep_until_done(comm: Communicator, busy: bool) -> None:
    """Ranks not ``busy`` sleep (never spin) until every busy rank is done."""
    work = comm.iallreduce(torch.zeros(1))
    if busy:
        work.wait()
        return
    while not work.test():
        time.sleep(0.002)
    work.wait()


def matmul_tflops(reps: int = PROBE_REPS) -> float:
    """TFLOP/s of a float32 ``PROBE_N`` cubed matmul on one thread of this process.

    One thread whatever ``OMP_NUM_THREADS`` says, so the figure is a core's, comparable
    between jobs launched differently.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(PROBE_N, PROBE_N, generator=gen)
        b = torch.randn(PROBE_N, PROBE_N, generator=gen)
        seconds = alone_median(lambda: torch.mm(a, b), reps)
    finally:
        torch.set_num_threads(threads)
    return 2.0 * PROBE_N**3 / seconds / 1e12


def probe_tflops(comm: Communicator) -> float:
    """The machine's speed now, the same on every rank: :func:`matmul_tflops` on rank 0.

    Every rank first finishes what it was doing (:func:`asleep_until_done`, all waiting), and
    the others sleep meanwhile, so it has a core to itself wherever ranks share them.
    """
    asleep_until_done(comm, False)
    mine = matmul_tflops() if comm.rank == 0 else 0.0
    asleep_until_done(comm, comm.rank == 0)
    return float(comm.allgather_object(mine)[0])
