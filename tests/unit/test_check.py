"""``mc2sim check`` in one process: loading, results records, report rows, group_size.

Loading an implementation, its records in the results folder, the report's rows of it, and
the scenario key it brought (per-group antiquant).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch

from mc2sim.errors import ParamInvalidError
from mc2sim.report import format_tables
from mc2sim.results import GoldenVerdict, ImplementationRecord, read_results, write_results
from mc2sim.scenario import load
from mc2sim.study.check import Outcome, RankVerdict, check_device, load_implementation
from mc2sim.timeline import RunKey, Stream, TaskRecord, Timeline

from .fakes import toy_manifest
from .test_results import SERIAL, serial_and_tiled, verdict

# ----------------------------------------------------------------------------- loading


def test_a_module_function_loads_by_name_and_by_file(tmp_path: Path) -> None:
    impl = load_implementation("examples.mc2_plugin:mm_all_reduce")
    assert (
        impl.fn.__name__ == "mm_all_reduce"
        and impl.label == "impl examples.mc2_plugin:mm_all_reduce"
    )
    plugin = tmp_path / "plugin.py"
    plugin.write_text("class K:\n    @staticmethod\n    def run(*a):\n        return 7\n")
    nested = load_implementation(f"{plugin}:K.run")
    assert nested.fn() == 7 and nested.spec == f"{plugin}:K.run"


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ("mm_all_reduce", "must be MODULE:FUNCTION (a module name or a .py file, a colon, a name)"),
        ("a:b:c", "must be MODULE:FUNCTION"),
        (":f", "must be MODULE:FUNCTION"),
        ("examples.mc2_plugin:", "must be MODULE:FUNCTION"),
        ("mc2sim_nowhere.sub:f", "no module named 'mc2sim_nowhere'"),
        ("examples.mc2_plugin:nope", "examples.mc2_plugin has no attribute 'nope'"),
        ("mc2sim.ops.spec:DTYPES", "mc2sim.ops.spec.DTYPES is a tuple, not callable"),
        ("nowhere/kernel.py:f", "no such file: nowhere/kernel.py"),
    ],
)
def test_a_bad_spec_is_one_parameter_error(spec: str, rule: str) -> None:
    with pytest.raises(ParamInvalidError) as info:
        load_implementation(spec)
    assert info.value.param == "--impl" and info.value.value == spec
    assert rule in info.value.rule


def test_an_import_that_fails_inside_the_module_names_its_error(tmp_path: Path) -> None:
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import mc2sim_missing_dependency\n")
    with pytest.raises(ParamInvalidError) as info:
        load_implementation(f"{plugin}:f")
    assert (
        "cannot be imported: ModuleNotFoundError: No module named 'mc2sim_missing_dependency'"
        in (info.value.rule)
    )
    plugin.write_text("x = (\n")
    with pytest.raises(ParamInvalidError, match="cannot be imported: SyntaxError"):
        load_implementation(f"{plugin}:f")


def test_devices_are_checked_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("meta")) == torch.device("meta")  # as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda"):
        with pytest.raises(ParamInvalidError) as info:
            check_device(bad)
        assert info.value.param == "--device"


# ----------------------------------------------------------------------------- records

LABEL = "impl plugin:mm"
IMPL_RUN = RunKey(op="mm_all_reduce", tiling=LABEL, repetition=2)


def with_impl(timeline: Timeline, seconds: float = 3.0) -> Timeline:
    tasks = [
        TaskRecord(
            rank=r,
            run=IMPL_RUN,
            task=0,
            name="implementation",
            stream=Stream.COMPUTE,
            kind="implementation",
            start_s=0.0,
            end_s=seconds,
        )  # fmt: skip
        for r in (0, 1)
    ]
    return Timeline(records=(*timeline.records, *tasks), source=timeline.source, meta=timeline.meta)


def shape_error(rank: int) -> GoldenVerdict:
    return RankVerdict(
        rank=rank, outcome=Outcome.SHAPE, detail="returned shape (1, 2), expected (2, 2)"
    ).record("allclose", "float16")


def test_an_implementation_round_trips_with_its_run_and_verdicts(tmp_path: Path) -> None:
    record = ImplementationRecord(
        impl="plugin:mm", device="cpu",
        verdicts=(GoldenVerdict.of(verdict(rank=0)), GoldenVerdict.of(verdict(rank=1, fail=True))),
        timed=True,
    )  # fmt: skip
    write_results(
        tmp_path / "out", timeline=with_impl(serial_and_tiled()), baseline=SERIAL,
        manifest=toy_manifest(tilings=("serial", "2")), implementations={LABEL: record},
    )  # fmt: skip
    folder = read_results(tmp_path / "out")
    assert dict(folder.implementations) == {LABEL: record}
    assert folder.runs[LABEL] == IMPL_RUN
    assert folder.metrics[LABEL].total_s == 3.0 and folder.metrics[LABEL].speedup == 2.0
    assert folder.passed(LABEL) is False  # rank 1's element (1, 1)
    table = format_tables([folder])
    row = next(line for line in table.splitlines() if line.startswith(LABEL))
    assert row.split() == [*LABEL.split(), "3000.000", "-", "-", "-", "-", "2.00", "FAIL"]
    assert (
        "  rank 1: allclose (float16) 1/4 mismatched; worst at (1, 1): actual 9.0, golden 4.0"
        in (table)
    )


def test_an_implementation_not_timed_keeps_why_on_each_rank(tmp_path: Path) -> None:
    record = ImplementationRecord(
        impl="plugin:mm", device="cpu",
        verdicts=(GoldenVerdict.of(verdict(rank=0)), shape_error(1)), timed=False,
    )  # fmt: skip
    write_results(
        tmp_path / "out", timeline=serial_and_tiled(), baseline=SERIAL,
        manifest=toy_manifest(tilings=("serial", "2")), implementations={LABEL: record},
    )  # fmt: skip
    folder = read_results(tmp_path / "out")
    assert folder.implementations[LABEL].verdicts[1].error == (
        "shape: returned shape (1, 2), expected (2, 2)"
    )
    assert LABEL not in folder.runs
    table = format_tables([folder])
    assert f"{LABEL:<26}{'not timed':>10}" in table
    assert "  rank 1: shape: returned shape (1, 2), expected (2, 2)" in table


def test_a_folder_written_before_implementations_still_reads(tmp_path: Path) -> None:
    write_results(
        tmp_path / "old", timeline=serial_and_tiled(), baseline=SERIAL,
        manifest=toy_manifest(tilings=("serial", "2")),
        verdicts={"serial": [verdict(rank=0), verdict(rank=1)]},
    )  # fmt: skip
    # as format 2 wrote it before: no "implementations", no verdict "error"; complete.json
    # lists the summary's digest, so rewrite both the way that writer did
    summary_path = tmp_path / "old" / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["implementations"]
    for v in summary["golden"]["serial"]:
        del v["error"]
    text = json.dumps(summary, indent=2) + "\n"
    summary_path.write_text(text)
    marker_path = tmp_path / "old" / "complete.json"
    marker = json.loads(marker_path.read_text())
    data = text.encode()
    marker["files"]["summary.json"] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    marker_path.write_text(json.dumps(marker, indent=2) + "\n")
    folder = read_results(tmp_path / "old")
    assert dict(folder.implementations) == {}
    assert all(v.error is None for v in folder.verdicts["serial"]) and folder.passed("serial")


def test_records_that_do_not_hold_together_are_refused(tmp_path: Path) -> None:
    good = ImplementationRecord(
        impl="plugin:mm", device="cpu", verdicts=(GoldenVerdict.of(verdict(rank=0)),), timed=True
    )
    with pytest.raises(ParamInvalidError, match="must be a run of the timeline"):
        write_results(
            tmp_path / "a", timeline=serial_and_tiled(), baseline=SERIAL,
            manifest=toy_manifest(tilings=("serial", "2")), implementations={LABEL: good},
        )  # fmt: skip
    with pytest.raises(ParamInvalidError, match="was not timed: no run"):
        write_results(
            tmp_path / "b", timeline=with_impl(serial_and_tiled()), baseline=SERIAL,
            manifest=toy_manifest(tilings=("serial", "2")),
            implementations={LABEL: dataclasses.replace(good, timed=False)},
        )  # fmt: skip
    with pytest.raises(ParamInvalidError, match="must be a GoldenVerdict of rank 0"):
        ImplementationRecord(
            impl="p:f", device="cpu", verdicts=(GoldenVerdict.of(verdict(rank=1)),), timed=False
        )
    with pytest.raises(ParamInvalidError, match="must be False with an error"):
        dataclasses.replace(shape_error(0), passed=True)


# ----------------------------------------------------------------------------- scenarios

MM = """
    name: grouped
    description: per-group antiquant
    op: mm_all_reduce
    ranks: 2
    dtype: bfloat16
    shape: {m: 16, k: 256, n: 64}
    quant: weight_int8
    tilings: [serial]
    topology: this_machine
    standard: allclose
    repetitions: 1
"""


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        (["shape.group_size=48"], "must be a multiple of 32 in [32, k-1] (k=256)"),
        (["shape.group_size=256"], "must be a multiple of 32 in [32, k-1] (k=256)"),
        (["shape.group_size=64", "quant=none"], "is for quant 'weight_int8' or 'weight_int4'"),
    ],
)
def test_group_size_rules(tmp_path: Path, overrides: list[str], rule: str) -> None:
    path = tmp_path / "grouped.yaml"
    path.write_text(textwrap.dedent(MM))
    assert load(path, ["shape.group_size=64"]).effective_shape()["group_size"] == 64
    with pytest.raises(ParamInvalidError) as info:
        load(path, overrides)
    assert rule in str(info.value) and "group_size" in str(info.value)
