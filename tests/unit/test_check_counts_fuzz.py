"""``mc2sim check-counts`` on generated dumps: a bad one is exit 2 and one line, never more.

The oracle is written here, apart from the code under test: a dump is valid when it is a
JSON object whose ``experts_per_rank`` is an int >= 1 and whose ``send_counts`` and
``recv_counts`` hold W >= 1 rows each of W * e ints in [0, 2**63) (no bools, no floats).
A valid dump exits 0 (consistent) or 1 (the invariant broken); anything else exits 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mc2sim.cli import main

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _is_count(v: object) -> bool:
    return type(v) is int and 0 <= v < 2**63


def _valid(doc: object) -> bool:
    """The oracle: is ``doc`` a well-formed dump?"""
    if not isinstance(doc, dict) or not {"experts_per_rank", "send_counts", "recv_counts"} <= set(
        doc
    ):
        return False
    e = doc["experts_per_rank"]
    if type(e) is not int or e < 1:
        return False
    tables = doc["send_counts"], doc["recv_counts"]
    if not all(isinstance(t, list) and t for t in tables) or len(tables[0]) != len(tables[1]):
        return False
    world = len(tables[0])
    return all(
        isinstance(row, list) and len(row) == world * e and all(_is_count(v) for v in row)
        for t in tables
        for row in t
    )


@st.composite
def consistent(draw: st.DrawFn) -> dict[str, Any]:
    """A dump that meets the invariant: recv[q][r*e+j] == send[r][q*e+j]."""
    world = draw(st.integers(1, 3))
    e = draw(st.integers(1, 3))
    send = [[draw(st.integers(0, 5)) for _ in range(world * e)] for _ in range(world)]
    recv = [[send[r][q * e + j] for r in range(world) for j in range(e)] for q in range(world)]
    return {"experts_per_rank": e, "send_counts": send, "recv_counts": recv}


BAD_COUNTS = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63, max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.just(1e30),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
BAD_E = st.one_of(
    st.integers(max_value=0),
    st.floats(),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(1, 2), max_size=2),
)


@st.composite
def malformed(draw: st.DrawFn) -> Any:
    """A consistent dump with one thing broken."""
    doc = draw(consistent())
    kind = draw(
        st.sampled_from(
            ["count", "e", "missing", "ragged", "extra_row", "row_type", "top", "table_type"]
        )
    )
    table = draw(st.sampled_from(["send_counts", "recv_counts"]))
    rows = doc[table]
    r = draw(st.integers(0, len(rows) - 1))
    if kind == "count":
        rows[r][draw(st.integers(0, len(rows[r]) - 1))] = draw(BAD_COUNTS)
    elif kind == "e":
        doc["experts_per_rank"] = draw(BAD_E)
    elif kind == "missing":
        del doc[draw(st.sampled_from(sorted(doc)))]
    elif kind == "ragged":
        rows[r] = rows[r][:-1] if draw(st.booleans()) else [*rows[r], 0]
    elif kind == "extra_row":
        rows.append(list(rows[0]))
    elif kind == "row_type":
        rows[r] = draw(st.one_of(st.integers(0, 3), st.text(max_size=3), st.none()))
    elif kind == "table_type":
        doc[table] = draw(st.one_of(st.just([]), st.integers(), st.text(max_size=3), st.none()))
    else:
        return draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text()))
    return doc


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
ANY_DOC = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"experts_per_rank": JSON | st.integers(0, 3), "send_counts": JSON, "recv_counts": JSON}
    ),
    st.fixed_dictionaries(
        {
            "experts_per_rank": st.integers(-1, 3),
            "send_counts": st.lists(st.lists(st.integers(-1, 3), max_size=4), max_size=3),
            "recv_counts": st.lists(st.lists(st.integers(-1, 3), max_size=4), max_size=3),
        }
    ),
)


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["check-counts", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if status == 2:
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mc2sim check-counts: "), captured.err
        assert str(path) in lines[0]
    return status, captured.out, captured.err


@FUZZ
@given(doc=consistent())
def test_a_consistent_dump_passes(
    doc: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    status, out, _ = _check(path, capsys)
    assert status == 0
    assert f"{sum(map(sum, doc['send_counts']))} rows" in out


@FUZZ
@given(doc=consistent(), data=st.data())
def test_a_broken_invariant_is_exit_1(
    doc: dict[str, Any], data: st.DataObject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = data.draw(st.sampled_from(doc["recv_counts"]))
    i = data.draw(st.integers(0, len(row) - 1))
    row[i] += data.draw(st.integers(1, 3))
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    status, _, err = _check(path, capsys)
    assert status == 1 and "(receiver q=" in err


@FUZZ
@given(doc=malformed())
def test_a_malformed_dump_is_exit_2_in_one_line(
    doc: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not _valid(doc)
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert _check(path, capsys)[0] == 2


@FUZZ
@given(doc=ANY_DOC)
def test_any_json_is_accepted_exactly_when_valid(
    doc: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    status = _check(path, capsys)[0]
    assert status == (2 if not _valid(doc) else status)
    assert (status in (0, 1)) == _valid(doc)


@FUZZ
@given(raw=st.binary(max_size=40) | st.text(max_size=40).map(lambda t: t.encode("utf-8")))
def test_bytes_that_are_not_a_dump_are_exit_2(
    raw: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "counts.json"
    path.write_bytes(raw)
    assert _check(path, capsys)[0] == 2
