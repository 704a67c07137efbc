"""Time ``mc2sim simulate --what-if --ranks W`` at thousands of ranks, through the command line.

For each world size W the command a user types runs in a fresh process::

    mc2sim simulate deepseek_v3_combine_ep32 --what-if --ranks W --no-plots --out TMP

timed wall-clock (Python start-up included) with its peak resident memory (the child's
``ru_maxrss``), as ``/usr/bin/time -v`` reports them. With ``--stages`` a second fresh process
runs the same functions the command calls (``mc2sim.cli`` -> ``Scenario.world_size`` ->
``simulate_study``: per tiling ``arrays_for`` (the MoE plans from the routing's law, above
1024 ranks) or ``routing_of`` and ``plans_for``, then ``simulate_arrays`` or ``simulate_run``
-> ``encode_study`` -> ``write_encoded``) and times each stage, so the table says where the
time goes. A W whose command runs past ``--timeout`` seconds is reported as such.

Targets (the issue's): W = 8192 within 5 s; W = 65536 within 60 s and 8 GiB peak memory; the
script exits 1 if one is missed.

    python scripts/bench_simulate.py                            # W = 1024 8192 65536
    python scripts/bench_simulate.py --ranks 256 1024 --stages
    python scripts/bench_simulate.py --against-draw 256        # the routing's law, checked
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_RANKS = (1024, 8192, 65536)
TARGETS = {8192: (5.0, None), 65536: (60.0, 8 * 1024.0)}
"""W -> (seconds, MiB of peak memory or None) the command may take (the issue's targets)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    """One W: the command's wall time and peak memory (None: it ran past the timeout)."""

    ranks: int
    wall_s: float | None
    peak_mib: float | None
    stages: dict[str, float]


def command(scenario: str, ranks: int, out: Path, overrides: Sequence[str]) -> list[str]:
    """The command line a user types, with this interpreter."""
    sets = [a for o in overrides for a in ("--set", o)]
    return [
        sys.executable, "-m", "mc2sim", "simulate", scenario, "--what-if", "--ranks", str(ranks),
        *sets, "--no-plots", "--out", str(out),
    ]  # fmt: skip


def run_command(
    scenario: str, ranks: int, overrides: Sequence[str], timeout: float
) -> tuple[float | None, float | None]:
    """Wall seconds and peak MiB of the command in a fresh process (None, None: timed out).

    The peak is the child's own ``ru_maxrss`` (``os.wait4``), as ``/usr/bin/time -v`` gives it.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "err", "w+b") as err:
        argv = command(scenario, ranks, Path(tmp) / "out", overrides)
        start = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        if wall >= timeout:
            return None, None
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"W={ranks}: the command failed:\n{err.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def stages(scenario_name: str, ranks: int, overrides: Sequence[str]) -> dict[str, float]:
    """Seconds of each stage of the command's code path, in this (fresh) process."""
    marks = {"start": time.perf_counter()}
    from mc2sim.cli import _load_scenario, _sized_topology
    from mc2sim.model.simulator import simulate_arrays, simulate_run
    from mc2sim.ops.moe_spec import routing_of
    from mc2sim.results import write_encoded
    from mc2sim.study.simulate import (
        PER_TASK_RECORDS,
        arrays_for,
        encode_study,
        plans_for,
        simulate_study,
    )

    marks["import"] = time.perf_counter()
    scenario = _load_scenario(scenario_name, list(overrides), True)
    world = scenario.world_size(ranks, "--ranks")
    topology = _sized_topology(scenario, None, world, "--ranks")
    marks["scenario"] = time.perf_counter()
    times = {"import": marks["import"] - marks["start"], "scenario": 0.0}
    times["scenario"] = marks["scenario"] - marks["import"]
    plan_s = sim_s = 0.0
    for tiling in scenario.tilings:  # what simulate_study does, stage by stage
        t = time.perf_counter()
        arrays = arrays_for(scenario, topology, tiling)
        if arrays is None and scenario.routed and "routing (once)" not in times:
            routing_of(scenario, world)  # drawn once per study, token by token
            times["routing (once)"] = time.perf_counter() - t
            t = time.perf_counter()
        plans = plans_for(scenario, world, tiling) if arrays is None else None
        plan_s += time.perf_counter() - t
        t = time.perf_counter()
        if arrays is not None:
            simulate_arrays(arrays, topology, scenario.stragglers)
        elif plans is not None:
            simulate_run(plans, topology, scenario.stragglers)
        sim_s += time.perf_counter() - t
        del plans, arrays
    times["plans"] = plan_s
    times["simulate"] = sim_s
    t = time.perf_counter()
    result = simulate_study(scenario, topology, world)  # all of the above again, as the CLI
    times["simulate_study"] = time.perf_counter() - t
    t = time.perf_counter()
    files = encode_study(result, argv=["bench"], per_task=result.records <= PER_TASK_RECORDS)
    times["encode"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_encoded(Path(tmp) / "out", files)
        times["write"] = time.perf_counter() - t
    times["output MiB"] = sum(len(b) for b in files.values()) / 2**20
    return times


def _stages_isolated(scenario: str, ranks: int, overrides: Sequence[str]) -> dict[str, float]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result: dict[str, float] = pool.apply(stages, (scenario, ranks, list(overrides)))
    return result


def against_draw(scenario_name: str, ranks: int, overrides: Sequence[str]) -> None:
    """Print each tiling's times from the routing's law against the token-by-token draw.

    The same study twice at ``ranks``: once with the law (as above 1024 ranks), once drawn.
    """
    import mc2sim.ops.moe_spec as moe_spec
    from mc2sim.cli import _load_scenario, _sized_topology
    from mc2sim.study.simulate import simulate_study

    scenario = _load_scenario(scenario_name, list(overrides), True)
    world = scenario.world_size(ranks, "--ranks")
    topology = _sized_topology(scenario, None, world, "--ranks")
    limit = moe_spec.EXPECTED_ROUTING_RANKS
    try:
        moe_spec.EXPECTED_ROUTING_RANKS = 10**9
        drawn = simulate_study(scenario, topology, world).metrics()
        moe_spec.EXPECTED_ROUTING_RANKS = 0
        law = simulate_study(scenario, topology, world).metrics()
    finally:
        moe_spec.EXPECTED_ROUTING_RANKS = limit
    print(f"# {scenario_name} at {world} ranks {' '.join(overrides)}: law / draw - 1")
    for tiling, m in drawn.items():
        got = law[tiling]
        cells = []
        for name in ("total_s", "comm_s", "compute_s"):
            base, mine = getattr(m, name), getattr(got, name)
            cells.append(f"{name} {base * 1e3:9.3f} ms {mine / base - 1:+6.1%}")
        print(f"  {tiling:22s} " + "  ".join(cells), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Time the command at each W; print the table; 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--scenario", default="deepseek_v3_combine_ep32", help="scenario")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS))
    parser.add_argument("--set", action="append", default=[], help="a --set of the command")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    parser.add_argument("--stages", action="store_true", help="also time each stage")
    parser.add_argument(
        "--against-draw",
        type=int,
        metavar="W",
        help="instead: the routing's law against the token draw at W ranks (MoE scenarios)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.against_draw:
        against_draw(args.scenario, args.against_draw, args.set)
        return 0
    print(f"# mc2sim simulate {args.scenario} --what-if --ranks W --no-plots "
          + " ".join(f"--set {s}" for s in args.set), flush=True)  # fmt: skip
    missed = []
    for ranks in args.ranks:
        wall, peak = run_command(args.scenario, ranks, args.set, args.timeout)
        seconds, mib = TARGETS.get(ranks, (None, None))
        verdict = ""
        if seconds is not None:
            ok = wall is not None and wall <= seconds and (mib is None or (peak or 0) <= mib)
            verdict = f"target <= {seconds:g} s" + (f", {mib:g} MiB" if mib else "")
            verdict += ": ok" if ok else ": MISSED"
            if not ok:
                missed.append(ranks)
        shown = f"{wall:8.2f} s {peak:8.0f} MiB" if wall is not None else f"> {args.timeout:g} s"
        print(f"W={ranks:>6}: {shown}  {verdict}", flush=True)
        if args.stages and wall is not None:
            parts = _stages_isolated(args.scenario, ranks, args.set)
            print("          " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
