"""Check any implementation of a scenario's op on every rank: golden, agreement, timing.

``mc2sim check SCENARIO --impl module:function`` (and :func:`check_implementation`) runs a
user's implementation of the scenario's op, a callable with the signature of the op's
function in :mod:`mc2sim.ops` (torch_npu-style names and arguments), on every rank with the
inputs mc2sim's own op gets (the op's spec builds them: :class:`mc2sim.ops.spec.RealCase`),
and gives it what mc2sim's own tilings get:

* a golden verdict per rank under the scenario's precision standard (worst element and
  its index), every rank holding every rank's verdict;
* agreement: before any output is compared, the ranks exchange how their call ended (an
  output of the op's form, shape and dtype, or not), so a rank that raised or returned
  another shape gets its verdict on every rank instead of leaving the others in a
  collective; the implementation's own arguments are the ones mc2sim's op agrees on
  (mc2sim's op is called first with the same arguments, under every tiling);
* deadlines: a call that does not return within ``MC2SIM_TIMEOUT`` seconds on a rank ends
  the job (exit status 3, one line naming the rank); a rank that raised while the others
  are still inside the call (waiting for it in the implementation's collectives) ends the
  job with one line naming it and the error (exit status 1);
* timing in the interleaved shuffled rounds of :func:`mc2sim.study.measure.measure_rounds`,
  beside mc2sim's tilings: one task per rank spanning the call (what happens inside an
  implementation is not seen), in the same results folder (its
  :class:`~mc2sim.results.ImplementationRecord`), so ``report`` shows it next to the
  tilings and the model's prediction.

An implementation that cannot run here (its library, device or world size is missing)
says so with :class:`Unavailable`, raised from the call on every rank or from a probe
attribute ``unavailable(comm) -> str | None`` of the callable, asked before any work (the
adapters of :mod:`mc2sim.adapters` have one); the check is then skipped with that reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mc2sim._compat import StrEnum
from mc2sim.comm import Communicator, agreed, rank_device
from mc2sim.comm.job import end_job
from mc2sim.comm.watchdog import POLL_S, TIMEOUT_STATUS, collectives_named, timeout_from_env
from mc2sim.compare import Verdict, check
from mc2sim.errors import ParamInvalidError
from mc2sim.ops.spec import OutputFormError, RealCase
from mc2sim.results import GoldenVerdict, ImplementationRecord
from mc2sim.scenario import Scenario
from mc2sim.study.measure import MeasuredStudy, measure_study, real_case
from mc2sim.timeline import RunKey, Stream, TaskRecord, current_recorder

__all__ = [
    "RAISED_GRACE_S",
    "SKIPPED_STATUS",
    "CheckedStudy",
    "Implementation",
    "ImplementationFailedError",
    "Outcome",
    "RankVerdict",
    "Unavailable",
    "check_device",
    "check_implementation",
    "load_implementation",
]

SKIPPED_STATUS = 4
"""Exit status of ``mc2sim check`` when the implementation cannot run here (skipped)."""

RAISED_GRACE_S = 10.0
"""How long a rank whose call raised waits for the others to return from theirs (at most
half the collective deadline, so its line comes before a watchdog's) before it ends the job:
they may be waiting for it inside the implementation's collectives."""

LEAD_S = 1.0
"""How long a rank other than 0 leaves rank 0 to end the job first when its call ran past
the deadline (every rank's may have)."""


class Unavailable(Exception):  # noqa: N818 - what it says: the implementation is unavailable
    """The implementation cannot run here (a library, a device or a world size is missing).

    Raised from an implementation's call on every rank (or returned as the reason by its
    ``unavailable(comm)`` probe), it skips the check with its message instead of failing it.
    """


class ImplementationFailedError(Exception):
    """A call of the implementation after the checked one failed on some rank (every rank)."""


class Outcome(StrEnum):
    """How one rank's checked call of an implementation ended.

    Glossary:
        ``pass``: it returned an output of the op's form, shape and dtype, within the
            precision standard of its golden.
        ``mismatch``: such an output, beyond the standard (the verdict says where).
        ``shape``: an output of another shape than the op's.
        ``dtype``: an output of another dtype than the op's.
        ``form``: not what the op returns (a tensor for a tuple, a tuple of another length).
        ``raised``: the call raised an exception (``sys.exit`` included).
    """

    PASS = "pass"
    MISMATCH = "mismatch"
    SHAPE = "shape"
    DTYPE = "dtype"
    FORM = "form"
    RAISED = "raised"


@dataclass(frozen=True, kw_only=True, slots=True)
class RankVerdict:
    """One rank's verdict of an implementation's output (the same record on every rank)."""

    rank: int
    """The rank whose call this is."""
    outcome: Outcome
    """How the call ended."""
    detail: str
    """One line: the comparison's summary, or what was wrong instead."""
    verdict: Verdict | None = None
    """The golden comparison, when the output could be compared (pass or mismatch)."""

    @property
    def passed(self) -> bool:
        """Whether the output met its golden."""
        return self.outcome is Outcome.PASS

    def record(self, standard: str, dtype: str) -> GoldenVerdict:
        """The verdict as the results folder stores it.

        Args:
            standard: the scenario's precision standard (for an output not compared).
            dtype: the op's output dtype (likewise).

        Returns:
            Its :class:`~mc2sim.results.GoldenVerdict`, with ``error`` set when the output
            could not be compared.
        """
        if self.verdict is not None:
            return GoldenVerdict.of(self.verdict)
        return GoldenVerdict(
            standard=standard, passed=False, dtype=dtype, numel=0, mismatches=0,
            mismatch_fraction=0.0, allowed_fraction=0.0, max_abs_error=0.0, max_rel_error=0.0,
            rank=self.rank, error=f"{self.outcome.value}: {self.detail}",
        )  # fmt: skip

    def summary(self) -> str:
        """``rank R: OUTCOME: detail``."""
        return f"rank {self.rank}: {self.outcome.value}: {self.detail}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Implementation:
    """A user's implementation of an op, loaded from ``module:function``."""

    spec: str
    """As given: ``module:function`` or ``path/to/file.py:function``."""
    fn: Callable[..., Any]
    """The callable (the op's signature)."""

    @property
    def label(self) -> str:
        """Its run's tiling in words in timelines and results folders: ``impl SPEC``."""
        return f"impl {self.spec}"


def load_implementation(spec: str, param: str = "--impl", *, rank: int = 0) -> Implementation:
    """Import ``module:function`` (or ``file.py:function``) and return the callable.

    The current directory is searched for the module as ``python -m`` does, after
    ``sys.path``. ``function`` may be a dotted path of attributes (``Class.method``). The
    import runs under the calls' deadline (``MC2SIM_TIMEOUT``): a module that never finishes
    importing ends the job (exit status 3, one line naming the module and the rank).

    Args:
        spec: ``module:function``; the module a dotted name or a path ending in ``.py``.
        param: what errors call the spec.
        rank: this process's rank, for the deadline's line.

    Returns:
        The implementation.

    Raises:
        ParamInvalidError: the spec is malformed, the module cannot be imported (missing,
            or raising as it is imported), the attribute is missing or not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.partition(":")[::2]):
        raise ParamInvalidError(
            param, spec, "must be MODULE:FUNCTION (a module name or a .py file, a colon, a name)"
        )
    module_name, _, attr = spec.partition(":")
    with _Deadline(timeout_from_env(), rank, spec, what=f"importing {module_name.strip()!r}"):
        module = _import(module_name.strip(), param, spec)
    target: Any = module
    walked = module_name
    for part in attr.strip().split("."):
        if not hasattr(target, part):
            raise ParamInvalidError(param, spec, f"{walked} has no attribute {part!r}")
        target = getattr(target, part)
        walked = f"{walked}.{part}"
    if not callable(target):
        raise ParamInvalidError(param, spec, f"{walked} is a {type(target).__name__}, not callable")
    return Implementation(spec=spec, fn=target)


def _import(name: str, param: str, spec: str) -> Any:
    """The module ``name`` (a dotted name or a ``.py`` path), or ParamInvalidError."""
    try:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise ParamInvalidError(param, spec, f"no such file: {name}")
            unique = f"_mc2sim_impl_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(unique, path)
            if loader is None or loader.loader is None:
                raise ParamInvalidError(param, spec, f"{name} is not a Python file")
            module = importlib.util.module_from_spec(loader)
            sys.modules[unique] = module
            folder = str(path.resolve().parent)
            if folder not in sys.path:  # its own helpers next to it import as they would
                sys.path.append(folder)
            loader.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # as python -m does, but after the installed ones
        return importlib.import_module(name)
    except ParamInvalidError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
            rule = f"no module named {exc.name!r} (on sys.path or in the current directory)"
        else:
            rule = f"module {name!r} cannot be imported: {_one_line(exc)}"
        raise ParamInvalidError(param, spec, rule) from None
    except BaseException as exc:  # noqa: BLE001 - any failure of the user's import is input
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ParamInvalidError(
            param, spec, f"module {name!r} cannot be imported: {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    """``Type: message``, the message's first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- the guarded call: a deadline on this rank, then every rank's outcome -----------------


class _Deadline:
    """Ends the job when one call on this rank runs past ``timeout`` seconds.

    Its line says ``{what} did not return``: the implementation ``label`` by default.
    """

    def __init__(self, timeout: float, rank: int, label: str, *, what: str = "") -> None:
        self.timeout, self.rank, self.label = timeout, rank, label
        self.what = what or f"implementation {label}"
        self._until: float | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        if self.timeout == float("inf"):
            return
        self._until = time.monotonic() + self.timeout
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="mc2sim-impl-deadline", daemon=True
            )
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._until = None

    def _loop(self) -> None:
        while True:
            time.sleep(POLL_S)
            until = self._until
            if until is None or time.monotonic() <= until:
                continue
            if self.rank != 0:  # rank 0's call may be past it too: its line first
                time.sleep(LEAD_S)
                if self._until != until:  # that call returned meanwhile
                    continue
            end_job(
                f"mc2sim: timeout: {self.what} did not return on rank {self.rank} within "
                f"{self.timeout:g} s",
                TIMEOUT_STATUS,
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Ended:
    """How this rank's call ended, as the other ranks need to know it (picklable)."""

    outcome: Outcome | None
    """None: an output of the op's form, shape and dtype (to be compared)."""
    detail: str = ""
    unavailable: str | None = None


class _Caller:
    """Calls an implementation on this rank, guarded, and agrees on how every call ended."""

    def __init__(
        self,
        impl: Implementation,
        real: RealCase,
        comm: Communicator,
        harness: Communicator,
        *,
        device: str,
        out_dtype: torch.dtype,
        op: str,
    ) -> None:
        self.impl, self.real, self.comm, self.harness = impl, real, comm, harness
        self.op = op
        self.device = device
        self.out_dtype = out_dtype
        self.timeout = timeout_from_env()
        self.deadline = _Deadline(self.timeout, comm.rank, impl.spec)
        self.args = tuple(_to(a, device) for a in real.args)
        self.kwargs = {k: _to(v, device) for k, v in real.kwargs.items()}
        self.repetition = 0

    def _invoke(self) -> torch.Tensor:
        return self.real.output(self.impl.fn(*self.args, **self.kwargs))

    def call(self, *, keep: bool = True) -> tuple[torch.Tensor | None, _Ended, float, float]:
        """One guarded call on this rank: how it ended, start and end (perf s).

        Args:
            keep: also return the output, on the host (None when it is not comparable).
        """
        out: torch.Tensor | None = None
        on_gpu = torch.device(self.device).type == "cuda"
        if on_gpu:  # what ran before is not this call's
            torch.cuda.synchronize(self.device)
        with self.deadline:
            start = time.perf_counter()
            try:
                out = self._invoke()
                if on_gpu or out.device.type == "cuda":  # its kernels are part of the call
                    torch.cuda.synchronize(out.device if out.device.type == "cuda" else None)
                end = time.perf_counter()
                ended = self._judge_form(out)
                if ended.outcome is None and keep:  # compared on the host
                    out = out.detach().to("cpu")
            except Unavailable as exc:
                ended = _Ended(outcome=Outcome.RAISED, detail=str(exc), unavailable=str(exc))
            except OutputFormError as exc:
                ended = _Ended(outcome=Outcome.FORM, detail=str(exc))
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: a verdict
                ended = _Ended(outcome=Outcome.RAISED, detail=_one_line(exc))
            if ended.outcome is not None:
                out, end = None, time.perf_counter()
        return out, ended, start, end

    def _judge_form(self, out: torch.Tensor) -> _Ended:
        expected = tuple(self.real.expected.shape)
        if tuple(out.shape) != expected:
            return _Ended(
                outcome=Outcome.SHAPE,
                detail=f"returned shape {tuple(out.shape)}, expected {expected}",
            )
        if out.dtype != self.out_dtype:
            return _Ended(
                outcome=Outcome.DTYPE,
                detail=f"returned dtype {_name(out.dtype)}, expected {_name(self.out_dtype)}",
            )
        return _Ended(outcome=None)

    def agree(self, ended: _Ended) -> list[_Ended]:
        """Every rank's :class:`_Ended`, on every rank; never leaves a rank waiting.

        A rank whose call raised gives the others :data:`RAISED_GRACE_S` (at most half the
        deadline) to return from theirs; if they do not, they are inside the
        implementation, waiting for it, and this rank ends the job with one line. The others
        wait under the communicator's deadline (its watchdog).
        """
        with collectives_named("check: returned"):
            arrived = self.harness.iallreduce(torch.ones(1, dtype=torch.int64))
            if ended.outcome is Outcome.RAISED and ended.unavailable is None:
                grace = min(RAISED_GRACE_S, self.timeout / 2)
                until = time.monotonic() + grace
                while not arrived.test():
                    if time.monotonic() > until:
                        end_job(
                            f"mc2sim: rank {self.comm.rank}/{self.comm.size}: implementation "
                            f"{self.impl.spec} raised {ended.detail}; the other ranks did not "
                            f"return from it within {grace:g} s (they wait for this one)",
                            1,
                        )
                    time.sleep(POLL_S / 10)
            arrived.wait()
            everyone: list[_Ended] = self.harness.allgather_object(ended)
        return everyone

    def timed(self) -> None:
        """One timed call (a round of :func:`measure_rounds`): its task, on every rank."""
        self.harness.barrier()  # the ranks start together, as the executor's runs do
        _, ended, start, end = self.call(keep=False)
        everyone = self.agree(ended)
        bad = [(r, e) for r, e in enumerate(everyone) if e.outcome is not None]
        if bad:
            rank, first = bad[0]
            raise ImplementationFailedError(
                f"implementation {self.impl.spec}: a timed call failed on rank {rank}: "
                f"{first.outcome}: {first.detail}"
            )
        sink = current_recorder()
        if sink is not None:
            run = RunKey(op=self.op, tiling=self.impl.label, repetition=self.repetition)
            sink.add(
                TaskRecord(
                    rank=self.comm.rank, run=run, task=0, name="implementation",
                    stream=Stream.COMPUTE, kind="implementation", start_s=0.0, end_s=end - start,
                )
            )  # fmt: skip
        self.repetition += 1


def _to(value: Any, device: str) -> Any:
    """A copy of ``value`` on ``device`` if it is a tensor; anything else as it is.

    A copy even on the same device: an implementation that writes into its inputs must not
    change what mc2sim's tilings get after it.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    return value


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the study ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckedStudy:
    """What ``check`` produced (the same on every rank)."""

    impl: Implementation
    """The implementation checked."""
    device: str
    """Where its inputs were."""
    skipped: str | None
    """Why it was not run (it is unavailable here), or None."""
    verdicts: tuple[RankVerdict, ...]
    """Every rank's verdict of its output (index = rank); empty when skipped."""
    measured: MeasuredStudy | None
    """mc2sim's tilings (verdicts and timings) and, when timed, the implementation's run
    (``measured.runs[impl.label]``); None when skipped."""
    record: ImplementationRecord | None
    """The implementation as the results folder stores it; None when skipped."""

    @property
    def timed(self) -> bool:
        """Whether the implementation was timed (every rank returned a comparable output)."""
        return self.record is not None and self.record.timed

    @property
    def passed(self) -> bool:
        """Whether every rank's output met its golden (and mc2sim's tilings' too)."""
        return (
            self.skipped is None
            and all(v.passed for v in self.verdicts)
            and self.measured is not None
            and self.measured.passed
        )


_HARNESS: dict[int, tuple[Communicator, Communicator]] = {}
"""A communicator's own copy for the harness (id -> (it, the copy)), kept apart from the one
the implementation gets, so the harness's collectives never meet the implementation's."""


def _harness_of(comm: Communicator) -> Communicator:
    kept = _HARNESS.get(id(comm))
    if kept is None or kept[0] is not comm:
        kept = _HARNESS[id(comm)] = (comm, comm.split(0, comm.rank))
    return kept[1]


def _unavailable(impl: Implementation, comm: Communicator, harness: Communicator) -> str | None:
    """The lowest rank's reason the implementation cannot run here, or None (every rank)."""
    probe = getattr(impl.fn, "unavailable", None)
    reason: str | None = None
    if callable(probe):
        try:
            reason = probe(comm)
        except Exception as exc:  # noqa: BLE001 - a broken probe is a reason too
            reason = f"its availability probe raised {_one_line(exc)}"
    reasons = harness.allgather_object(reason)
    return next((f"rank {r}: {why}" for r, why in enumerate(reasons) if why), None)


def check_implementation(
    scenario: Scenario,
    impl: Implementation | str,
    comm: Communicator,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> CheckedStudy:
    """Check and time ``impl`` beside mc2sim's own tilings of ``scenario`` (every rank).

    The order: the availability probe (every rank); mc2sim's op under each tiling, golden
    checked (it also agrees the arguments across ranks, as every run of it does); the
    implementation's checked call with the same arguments (on ``device``), every rank's
    outcome agreed, then compared with the golden; then, if every rank returned an output
    of the op's form, shape and dtype, the tilings and the implementation timed together in
    ``scenario.repetitions`` interleaved shuffled rounds.

    Args:
        scenario: the study; its op's function in :mod:`mc2sim.ops` gives the signature.
        impl: the implementation, or its ``module:function``.
        comm: every rank of the job (the implementation gets it as the op's ``comm``).
        device: where every rank's inputs are, mc2sim's tilings run (its executor on an
            accelerator) and the implementation gets its copies: ``"cpu"``, ``"cuda"``,
            ``"auto"`` (:func:`check_device`) or a ``torch.device``.
        progress: called on every rank after each timing round (``measure_rounds``).

    Returns:
        The verdicts, timings and the record for the results folder; the same on every rank.

    Raises:
        ParamInvalidError: a malformed ``impl`` or ``device``, or ranks naming different
            ones (on every rank alike).
        ImplementationFailedError: a timed call (after a passing checked call) failed.
    """
    harness = _harness_of(comm)
    with agreed(harness) as same:  # a bad spec or device on one rank stops every rank
        if isinstance(impl, str):
            impl = load_implementation(impl, "impl", rank=comm.rank)
        where = check_device(device)
        target = str(where)
        same("impl", impl.spec, "every rank runs the same implementation")
        same("device", where.type, "the ranks' inputs are on one kind of device")
    skipped = _unavailable(impl, comm, harness)
    if skipped is not None:
        return CheckedStudy(
            impl=impl, device=target, skipped=skipped, verdicts=(), measured=None, record=None
        )
    real = real_case(scenario, comm, where)
    reference = real.run("serial")  # mc2sim's op: agrees the arguments, gives the out dtype
    caller = _Caller(
        impl, real, comm, harness, device=target, out_dtype=reference.dtype,
        op=scenario.op.value,
    )  # fmt: skip
    out, ended, _, _ = caller.call()
    everyone = caller.agree(ended)
    unavailable = [e.unavailable for e in everyone]
    if all(unavailable):
        return CheckedStudy(
            impl=impl, device=target, skipped=f"rank 0: {unavailable[0]}", verdicts=(),
            measured=None, record=None,
        )  # fmt: skip
    mine = _verdict(comm.rank, out, ended, real, scenario)
    verdicts = tuple(harness.allgather_object(mine))
    timed = all(e.outcome is None for e in everyone)
    alongside = {impl.label: caller.timed} if timed else {}
    measured = measure_study(
        scenario, comm, progress=progress, alongside=alongside, real=real, device=where
    )
    dtype = _name(reference.dtype)
    record = ImplementationRecord(
        impl=impl.spec,
        device=target,
        verdicts=tuple(v.record(str(scenario.standard), dtype) for v in verdicts),
        timed=timed,
    )
    return CheckedStudy(
        impl=impl, device=target, skipped=None, verdicts=verdicts, measured=measured,
        record=record,
    )  # fmt: skip


def check_device(device: str | torch.device) -> torch.device:
    """This rank's device for ``device``, as ``mc2sim run --device`` chooses it.

    Args:
        device: ``"cpu"``, ``"cuda"`` (the GPU of the rank's local rank), ``"auto"`` (that
            GPU if the host has one, else the CPU), or a ``torch.device`` (taken as it is).

    Returns:
        The device.

    Raises:
        ParamInvalidError: an unknown choice, or ``cuda`` on a host without a CUDA GPU.
    """
    if isinstance(device, torch.device):
        return device
    return rank_device(device, "--device")


def _verdict(
    rank: int, out: torch.Tensor | None, ended: _Ended, real: RealCase, scenario: Scenario
) -> RankVerdict:
    """This rank's verdict: how its call ended, or the golden comparison of its output."""
    if ended.outcome is not None or out is None:
        outcome = ended.outcome if ended.outcome is not None else Outcome.RAISED
        return RankVerdict(rank=rank, outcome=outcome, detail=ended.detail)
    verdict = check(out.detach().cpu(), real.expected, scenario.standard, rank=rank, k=real.k)
    return RankVerdict(
        rank=rank,
        outcome=Outcome.PASS if verdict.passed else Outcome.MISMATCH,
        detail=verdict.summary().removeprefix(f"rank {rank}: "),
        verdict=verdict,
    )


def outcomes_line(verdicts: Mapping[int, RankVerdict] | tuple[RankVerdict, ...]) -> str:
    """``pass`` when every rank passed, else the failing ranks' outcomes, compactly."""
    items = verdicts.values() if isinstance(verdicts, Mapping) else verdicts
    failed = [v for v in items if not v.passed]
    if not failed:
        return "pass"
    return "FAIL (" + ", ".join(f"rank {v.rank}: {v.outcome.value}" for v in failed) + ")"
