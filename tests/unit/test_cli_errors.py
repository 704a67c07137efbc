"""The command line's one error path: every bad input is one line, exit status 2, before work.

Each case runs ``main([...])`` in this process. The commands that start MPI get a stand-in
communicator of two ranks that hold the same data (``SameOnEveryRank``), so their checks and
the ranks' agreement on them run without MPI; the work itself (measuring, calibrating,
running a script) is replaced by a tripwire: a bad input must be found before it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mc2sim.cli import main

from .fakes import SameOnEveryRank

ROOT = Path(__file__).parents[2]
TP = (ROOT / "scenarios" / "llama70b_tp8_decode.yaml").read_text(encoding="utf-8")
MOE = (ROOT / "scenarios" / "seed_gmm_alltoallv_ep4.yaml").read_text(encoding="utf-8")
TOPOLOGY = (ROOT / "topologies" / "atlas_a2_8p.yaml").read_text(encoding="utf-8")
CAL = (ROOT / "scenarios" / "calibration" / "cal_mm_64x256x256.yaml").read_text(encoding="utf-8")
RS = (ROOT / "scenarios" / "validation" / "val_reduce_scatter.yaml").read_text(encoding="utf-8")
SMALL = ["--set", "scale=small", "--no-plots"]


_MISSING = object()


def _counts(**doc: object) -> str:
    base: dict[str, object] = {
        "experts_per_rank": 1,
        "send_counts": [[1, 2], [3, 4]],
        "recv_counts": [[1, 3], [2, 4]],
    }
    base.update(doc)
    return json.dumps({k: v for k, v in base.items() if v is not _MISSING})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad (and a few good) inputs, made once."""
    t = tmp_path_factory.mktemp("inputs")
    (t / "good.yaml").write_text(TP, encoding="utf-8")
    (t / "nonutf8.yaml").write_bytes(b"name: caf\xe9\n")
    (t / "badyaml.yaml").write_text("name: [unclosed\n", encoding="utf-8")
    (t / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    (t / "syntax.py").write_text("import os\ndef f(:\n    pass\n", encoding="utf-8")
    (t / "latin1.py").write_bytes(b'x = "caf\xe9"\n')
    (t / "twice.yaml").write_text("name: x\nranks: 2\nranks: 4\n", encoding="utf-8")
    os.mkfifo(t / "fifo.yaml")  # opening it to read would wait for a writer forever
    (t / "unknown.yaml").write_text(TP + "colour: blue\n", encoding="utf-8")
    (t / "python.yaml").write_text("!!python/object/apply:os.system [ls]\n", encoding="utf-8")
    (t / "zero_reps.yaml").write_text(
        TP.replace("repetitions: 5", "repetitions: 0"), encoding="utf-8"
    )
    (t / "huge_seed.yaml").write_text(
        MOE.replace("seed: 0", "seed: 18446744073709551616"), encoding="utf-8"
    )
    (t / "deep.yaml").write_text("[" * 5000 + "]" * 5000, encoding="utf-8")
    # validate-model --cases: a calibration call under another name; a shape of one rank
    # that 2 cannot split; two files of one scenario name
    (t / "fitted.yaml").write_text(
        CAL.replace("name: cal_mm_64x256x256", "name: mine"), encoding="utf-8"
    )
    (t / "odd_m.yaml").write_text(
        RS.replace("ranks: 4", "ranks: 1").replace("m: 1024", "m: 1023"), encoding="utf-8"
    )
    (t / "twins").mkdir()
    for twin in ("a", "b"):
        (t / "twins" / f"{twin}.yaml").write_text(RS, encoding="utf-8")
    (t / "nul.yaml").write_bytes(b"name: a\x00b\n")  # PyYAML's message has two lines
    (t / "m_deep.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    (t / "afile").write_text("not a folder\n", encoding="utf-8")
    (t / "adir").mkdir()
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("the user's own notes\n", encoding="utf-8")
    (t / "m_bad.json").write_text("{not json", encoding="utf-8")
    (t / "m_nonutf8.json").write_bytes(b"[[1, 2\xff]]")
    (t / "m_shape.csv").write_text("1,2,3\n", encoding="utf-8")
    (t / "m_neg.csv").write_text("-1,0,0,0,0,0,0,0\n" * 2, encoding="utf-8")
    (t / "m_text.csv").write_text("a,b\n", encoding="utf-8")
    # 4 ranks x 16 experts: entries past int64 (unsigned), and rows past BSK's 52428799
    np.save(t / "m_huge.npy", np.full((4, 16), 2**64 - 1, dtype=np.uint64))
    (t / "m_rows.csv").write_text(",".join(["4000000"] * 16) + "\n" * 1, encoding="utf-8")
    with (t / "m_rows.csv").open("a", encoding="utf-8") as rows:
        rows.write((",".join(["1"] * 16) + "\n") * 3)
    (t / "m.txt").write_text("1\n", encoding="utf-8")
    (t / "topo_neg.yaml").write_text(
        TOPOLOGY.replace("bandwidth_gbps: 28.0", "bandwidth_gbps: -28.0"), encoding="utf-8"
    )
    (t / "topo_list.yaml").write_text("[1, 2]\n", encoding="utf-8")
    shipped = Path(__file__).parents[2] / "topologies" / "this_machine.yaml"
    fitted = shipped.read_text(encoding="utf-8")
    assert "  - kind: matmul\n" in fitted
    (t / "topo_kind.yaml").write_text(
        fitted.replace("  - kind: matmul\n", "  - kind: bogus\n", 1), encoding="utf-8"
    )
    # results folders: one complete, and broken copies of it
    done = t / "done"
    assert main(["simulate", "llama70b_tp8_decode", *SMALL, "--out", str(done)]) == 0
    for name in ("incomplete", "cut", "strings", "mixed", "fifo_tasks", "fifo_trace"):
        shutil.copytree(done, t / name)
    for name, file in (("fifo_tasks", "tasks.csv"), ("fifo_trace", "trace.json")):
        (t / name / file).unlink()
        os.mkfifo(t / name / file)  # reading it would wait for a writer for ever
    (t / "incomplete" / "complete.json").unlink()
    cut = (t / "cut" / "tasks.csv").read_bytes()
    (t / "cut" / "tasks.csv").write_bytes(cut[: len(cut) - 7])  # in the middle of a row
    summary = json.loads((t / "strings" / "summary.json").read_text(encoding="utf-8"))
    summary["runs"][0]["metrics"]["total_s"] = "fast"
    (t / "strings" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    other = t / "other"
    assert (
        main(["simulate", "llama70b_tp8_decode", *SMALL, "--ranks", "4", "--out", str(other)]) == 0
    )
    shutil.copy(other / "summary.json", t / "mixed" / "summary.json")
    for name, text in {
        "c_neg": _counts(send_counts=[[1, -2], [3, 4]]),
        "c_frac": _counts(send_counts=[[1, 2.5], [3, 4]]),
        "c_bool": _counts(recv_counts=[[True, 3], [2, 4]]),
        "c_1e30": _counts(send_counts=[[1e30, 2], [3, 4]]),
        "c_big_int": _counts(send_counts=[[10**30, 2], [3, 4]]),
        "c_nan": _counts().replace("[[1, 2]", "[[NaN, 2]"),
        "c_text": _counts(send_counts=[["1", 2], [3, 4]]),
        "c_e_frac": _counts(experts_per_rank=1.5),
        "c_e_zero": _counts(experts_per_rank=0),
        "c_e_bool": _counts(experts_per_rank=True),
        "c_extra": _counts(recv_count=[[1, 3], [2, 4]]),
        "c_twice": _counts().replace(
            '"recv_counts"', '"recv_counts": [[9, 9], [9, 9]], "recv_counts"'
        ),
        "c_e_text": _counts(experts_per_rank="1"),
        "c_ragged": _counts(send_counts=[[1, 2], [3]]),
        "c_shape": _counts(experts_per_rank=2),
        "c_rows": _counts(recv_counts=[[1, 3]]),
        "c_row_int": _counts(send_counts=[1, 2]),
        "c_empty": _counts(send_counts=[], recv_counts=[]),
        "c_nested": _counts(send_counts=[[[1], 2], [3, 4]]),
        "c_no_key": _counts(recv_counts=_MISSING),
        "c_list": "[1, 2, 3]",
        "c_not_json": "{experts_per_rank: 1",
        "c_deep": "[" * 100_000 + "]" * 100_000,
    }.items():
        (t / f"{name}.json").write_text(text, encoding="utf-8")
    (t / "c_nonutf8.json").write_bytes(b'{"experts_per_rank": 1\xff}')
    return t


@pytest.fixture(autouse=True)
def no_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A stand-in for MPI of two ranks, and a tripwire on the work of every command."""
    import runpy

    import mc2sim.comm
    import mc2sim.study.calibrate
    import mc2sim.study.measure
    import mc2sim.study.simulate
    import mc2sim.study.validate

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started although an input was bad")

    monkeypatch.setattr(mc2sim.comm, "init", lambda *a, **k: SameOnEveryRank(2))
    monkeypatch.setattr(mc2sim.study.measure, "measure_study", tripwire)
    monkeypatch.setattr(mc2sim.study.calibrate, "calibrate", tripwire)
    monkeypatch.setattr(mc2sim.study.validate, "held_out_cases", tripwire)
    monkeypatch.setattr(mc2sim.study.simulate, "simulate_study", tripwire)
    monkeypatch.setattr(runpy, "run_path", tripwire)
    yield


# (argv with {t} for the inputs folder, fragments the one line must hold)
CASES: list[tuple[list[str], list[str]]] = [
    # world sizes
    (["simulate", "llama70b_tp8_decode", "--ranks", "0"], ["--ranks=0", "[1, 65536]"]),
    (["simulate", "llama70b_tp8_decode", "--ranks", "-1"], ["--ranks=-1", "[1, 65536]"]),
    (["simulate", "seed_gmm_alltoallv_ep4", "--ranks", "65"], ["--ranks=65", "256"]),
    (["simulate", "seed_gmm_alltoallv_ep4", "--ranks", "1000"], ["--ranks=1000", "256"]),
    (["simulate", "llama70b_tp8_decode", "--ranks", "1000000"], ["--ranks=1000000", "65536"]),
    (["simulate", "llama70b_tp8_decode", "--ranks", "x"], ["--ranks", "'x'", "invalid int"]),
    (
        ["simulate", "llama70b_tp8_decode", "--topology", "atlas_a2_multinode", "--ranks", "12"],
        ["--ranks=12", "multiple of 8"],
    ),
    (["simulate", "llama70b_tp8_reducescatter", "--ranks", "7"], ["--ranks=7", "multiple"]),
    (["sweep", "llama70b_tp8_decode", "--ranks", "0"], ["--ranks=0", "[1, 65536]"]),
    (["sweep", "seed_gmm_alltoallv_ep4", "--ranks", "65"], ["--ranks=65", "256"]),
    (["sweep", "llama70b_tp8_decode", "--ranks", "70000"], ["--ranks=70000", "65536"]),
    (["sweep", "llama70b_tp8_decode", "--real", "--ranks", "4"], ["--ranks=4", "--real"]),
    (["sweep", "llama70b_tp8_decode", "--device", "cuda"], ["--device='cuda'", "--real"]),
    (
        ["sweep", "llama70b_tp8_decode", "--real", "--device", "cuda"],
        ["--device='cuda'", "needs a CUDA GPU"],
    ),
    (["run", "seed_gmm_alltoallv_ep4", "--set", "ranks=65"], ["ranks=65", "256"]),
    # scenario files and --set
    (["simulate", "nosuch"], ["scenario='nosuch'", "neither a scenario file nor a shipped"]),
    (["simulate", "{t}/absent.yaml"], ["absent.yaml'", "neither a scenario file"]),
    (["simulate", "{t}/adir"], ["adir'", "must be a regular file"]),
    (["simulate", "{t}/fifo.yaml"], ["fifo.yaml'", "must be a regular file"]),
    (["simulate", "{t}/twice.yaml"], ["twice.yaml='line 3, column 1'", "'ranks' is given twice"]),
    (["simulate", "llama70b_tp8_decode", "--topology", "/dev/zero"], ["must be a regular file"]),
    (["simulate", "{t}/nonutf8.yaml"], ["nonutf8.yaml=", "byte 9", "not UTF-8"]),
    (["simulate", "{t}/badyaml.yaml"], ["badyaml.yaml=", "line 2", "not valid YAML"]),
    (["simulate", "{t}/list.yaml"], ["list.yaml=[1, 2]", "must be a mapping"]),
    (["simulate", "{t}/unknown.yaml"], ["unknown.yaml: colour='blue'", "unknown key"]),
    (["simulate", "{t}/python.yaml"], ["python.yaml=", "not valid YAML"]),
    (["simulate", "{t}/deep.yaml"], ["deep.yaml=", "nested too deeply"]),
    (["simulate", "{t}/nul.yaml"], ["nul.yaml='character 8'", "unacceptable character #x0000"]),
    (["sweep", "{t}/nul.yaml"], ["nul.yaml='character 8'", "not valid YAML"]),
    (["simulate", "{t}/zero_reps.yaml"], ["zero_reps.yaml: repetitions=0", "in [1, 10000]"]),
    (["simulate", "{t}/huge_seed.yaml"], ["routing.seed=18446744073709551616", "4294967295"]),
    (["simulate", "llama70b_tp8_decode", "--set", "ranks"], ["--set='ranks'", "KEY=VALUE"]),
    (["simulate", "llama70b_tp8_decode", "--set", "colour=blue"], ["--set colour", "unknown"]),
    (["simulate", "llama70b_tp8_decode", "--set", "ranks=abc"], ["--set ranks='abc'", "integer"]),
    (["simulate", "llama70b_tp8_decode", "--set", "ranks=0"], ["--set ranks=0", "[1, 65536]"]),
    (["simulate", "llama70b_tp8_decode", "--set", "scale=huge"], ["scale='huge'", "one of"]),
    (["simulate", "llama70b_tp8_decode", "--set", "dtype=int3"], ["dtype='int3'", "one of"]),
    (["simulate", "llama70b_tp8_decode", "--set", "shape.m=0"], ["shape.m=0", ">= 1"]),
    (["simulate", "llama70b_tp8_decode", "--set", "tilings=serial,99"], ["99", "[1, 16]"]),
    (["simulate", "llama70b_tp8_decode", "--set", "tilings=4"], ["tilings", "'serial'"]),
    (["simulate", "llama70b_tp8_decode", "--set", "topology=nosuch"], ["topology", "nosuch"]),
    (["simulate", "seed_gmm_alltoallv_ep4", "--set", "quant=w8a8"], ["quant", "w8a8"]),
    (
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "routing.seed=99999999999999999999"],
        ["routing.seed=99999999999999999999", "[0, 4294967295]"],
    ),
    (
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "routing.seed=-1"],
        ["routing.seed=-1", "[0, 4294967295]"],
    ),
    (
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "routing.skew=inf"],
        ["routing.skew=inf", "finite"],
    ),
    (
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "routing.kind=matrix"],
        ["matrix_path=None", "required"],
    ),
    (["run", "{t}/absent.yaml"], ["absent.yaml'", "neither a scenario file"]),
    (["run", "{t}/nonutf8.yaml"], ["nonutf8.yaml=", "not UTF-8"]),
    (["run", "llama70b_tp8_decode", "--set", "topology={t}/nonutf8.yaml"], ["not UTF-8"]),
    # shapes within every limit that no host can run: terabytes, and FLOPs past int64
    (
        ["run", "llama70b_tp8_decode", "--set", "shape.m=2147483647", "--set", "shape.k=8192"],
        ["run: shape={'m': 2147483647, 'k': 8192, 'n': 8192}", "is too large to run here"],
    ),
    (
        [
            "run",
            "llama70b_tp8_decode",
            "--set",
            "shape.m=2147483647",
            "--set",
            "shape.k=65535",
            "--set",
            "shape.n=65535",
        ],
        ["(matmul[0])='1.84462e+19 FLOPs'", "must be in [0, 2**62)"],
    ),  # fmt: skip
    (["sweep", "{t}/badyaml.yaml"], ["badyaml.yaml=", "not valid YAML"]),
    (["sweep", "llama70b_tp8_decode", "--set", "shape.m=64,0"], ["shape.m=0", ">= 1"]),
    (["sweep", "llama70b_tp8_decode", "--real", "--set", "dtype=a,b"], ["dtype='a'", "one of"]),
    # routing matrix files
    *[
        (
            [
                "simulate",
                "seed_gmm_alltoallv_ep4",
                "--set",
                "routing.kind=matrix",
                "--set",
                f"routing.matrix_path={{t}}/{name}",
            ],
            ["routing.matrix_path=", name, rule],
        )  # fmt: skip
        for name, rule in [
            ("absent.csv", "no such file"),
            ("m_bad.json", "cannot be read"),
            ("m_nonutf8.json", "cannot be read"),
            ("m_shape.csv", "shape (1, 3)"),
            ("m_neg.csv", ">= 0"),
            ("m_text.csv", "cannot be read"),
            ("m.txt", ".npy, .csv or .json"),
            ("m_deep.json", "cannot be read"),
            ("m_huge.npy", "row sums must be below 2**62"),
        ]
    ],
    (
        [
            "simulate",
            "seed_gmm_alltoallv_ep4",
            "--set",
            "routing.kind=matrix",
            "--set",
            "routing.matrix_path={t}/m_rows.csv",
        ],
        ["routing.matrix_path row 0: tokens * top_k=64000000", "BSK must be in [1, 52428799]"],
    ),
    # topologies
    (["simulate", "llama70b_tp8_decode", "--topology", "nosuch"], ["--topology='nosuch'"]),
    (["simulate", "llama70b_tp8_decode", "--topology", "{t}/nonutf8.yaml"], ["not UTF-8"]),
    (["simulate", "llama70b_tp8_decode", "--topology", "{t}/badyaml.yaml"], ["not valid YAML"]),
    (["simulate", "llama70b_tp8_decode", "--topology", "{t}/deep.yaml"], ["nested too deeply"]),
    (["simulate", "llama70b_tp8_decode", "--topology", "{t}/nul.yaml"], ["#x0000", "valid YAML"]),
    (
        ["simulate", "llama70b_tp8_decode", "--topology", "{t}/topo_kind.yaml"],
        [".kind='bogus'", "unknown compute kind; known: matmul"],
    ),
    (
        ["simulate", "llama70b_tp8_decode", "--topology", "{t}/topo_neg.yaml"],
        ["topo_neg.yaml: network[0].bandwidth_gbps=-28.0", "> 0"],
    ),
    (["simulate", "llama70b_tp8_decode", "--topology", "{t}/topo_list.yaml"], ["must be a"]),
    (["sweep", "llama70b_tp8_decode", "--topology", "{t}/absent.yaml"], ["--topology="]),
    (["validate-model", "--topology", "{t}/absent.yaml"], ["--topology=", "no such file"]),
    (["validate-model", "--topology", "{t}/adir"], ["--topology=", "is not a file"]),
    (["validate-model", "--topology", "{t}/nonutf8.yaml"], ["nonutf8.yaml=", "not UTF-8"]),
    (["validate-model", "--topology", "{t}/topo_neg.yaml"], ["bandwidth_gbps=-28.0", "> 0"]),
    (["validate-model", "--topology", "{t}/good.yaml"], ["good.yaml: op=", "unknown key"]),
    (["simulate", "llama70b_tp8_decode", "--at-run-speed"], ["--at-run-speed=True", "--measured"]),
    (["validate-model", "--calibrate", "--at-run-speed"], ["--at-run-speed=True", "stored fit"]),
    (
        ["validate-model", "--calibrate", "--topology", "atlas_a2_8p"],
        ["--topology='atlas_a2_8p'", "a stored fit to check: --calibrate fits now"],
    ),
    (
        ["validate-model", "--topology", "atlas_a2_8p", "--at-run-speed"],
        ["--at-run-speed='atlas_a2_8p'", "no speed probe"],
    ),
    (["validate-model", "--cases", "{t}/absent.yaml"], ["--cases=", "no such file or folder"]),
    (["validate-model", "--cases", "{t}/adir"], ["--cases=", "without scenario files"]),
    (["validate-model", "--cases", "{t}/m.txt"], ["--cases=", "must be a scenario file"]),
    (["validate-model", "--cases", ""], ["--cases=''", "must name a scenario file"]),
    (["validate-model", "--cases", "{t}/badyaml.yaml"], ["badyaml.yaml", "not valid YAML"]),
    (["validate-model", "--cases", "{t}/unknown.yaml"], ["unknown.yaml: colour", "unknown key"]),
    (
        ["validate-model", "--cases", "{t}/fitted.yaml"],
        ["--cases='{t}/fitted.yaml'", "cal_mm_64x256x256.yaml, which calibrate fits on"],
    ),
    (
        ["validate-model", "--cases", "{t}/odd_m.yaml"],
        ["--cases='{t}/odd_m.yaml'", "cannot run on 2 ranks", "m (1023) must be a multiple"],
    ),
    (
        ["validate-model", "--cases", "{t}/twins"],
        ["--cases='{t}/twins/b.yaml'", "holds scenario 'val_reduce_scatter', as {t}/twins/a"],
    ),
    (
        ["validate-model", "--cases", "{t}/twins", "{t}/twins/a.yaml"],
        ["--cases='{t}/twins/a.yaml'", "is given twice (also as {t}/twins/a.yaml)"],
    ),
    # output paths, found before any work
    (["simulate", "llama70b_tp8_decode", "--out", "{t}/afile"], ["--out=", "is a file"]),
    # empty strings (an unset shell variable) were read as '.' or as the flag left out
    (["simulate", ""], ["scenario=''", "must name a scenario file"]),
    (["run", ""], ["scenario=''", "must name a scenario file"]),
    (["simulate", "llama70b_tp8_decode", "--topology", ""], ["--topology=''", "neither"]),
    (["simulate", "llama70b_tp8_decode", "--out", ""], ["--out=''", "must name a folder"]),
    (["sweep", "llama70b_tp8_decode", "--out", " "], ["--out=' '", "must name a folder"]),
    (["run", "llama70b_tp8_decode", "--out", ""], ["--out=''", "must name a folder"]),
    (["simulate", "llama70b_tp8_decode", "--out", "{t}/afile/sub"], ["--out=", "not a folder"]),
    (
        ["simulate", "llama70b_tp8_decode", "--out", "{t}/done"],
        ["--out=", "not empty", "--overwrite"],
    ),
    (
        ["simulate", "llama70b_tp8_decode", "--out", "{t}/mine", "--overwrite"],
        ["--out=", "'notes.txt'", "did not write"],
    ),
    (
        [
            "simulate",
            "llama70b_tp8_decode",
            "--measured",
            "{t}/done",
            "--out",
            "{t}/done",
            "--overwrite",
        ],
        ["--out=", "--measured"],
    ),  # fmt: skip
    (["simulate", "llama70b_tp8_decode", "--measured", "{t}/absent"], ["--measured=", "no such"]),
    (["simulate", "llama70b_tp8_decode", "--measured", "{t}/afile"], ["--measured=", "a file"]),
    (["simulate", "llama70b_tp8_decode", "--measured", "{t}/incomplete"], ["incomplete"]),
    (
        ["simulate", "llama70b_tp8_decode", *SMALL, "--measured", "{t}/done"],
        ["--measured=", "must be a folder of `mc2sim run` (it holds a simulation)"],
    ),
    (["sweep", "llama70b_tp8_decode", "--out", "{t}/afile"], ["--out=", "is a file"]),
    (["simulate", "llama70b_tp8_decode", "--out", "{t}/" + "a" * 300], ["--out=", "too long"]),
    # a sweep's grid: a key twice would win silently in every point; a grid past the cap
    (
        ["sweep", "llama70b_tp8_decode", "--set", "shape.m=8,16", "--set", "shape.m=32,64"],
        ["--set shape.m='32,64'", "is given twice", "--set shape.m=8,16"],
    ),
    (
        ["sweep", "llama70b_tp8_decode", "--set", "shape.m=8,16", "--set", " shape.m =32"],
        ["--set shape.m='32'", "is given twice"],
    ),
    (
        [
            "simulate",
            "seed_gmm_alltoallv_ep4",
            "--set",
            "routing.kind=hot",
            "--set",
            "routing.hot_fraction=1",
            "--set",
            "routing.hot_experts=1",
        ],
        ["routing.hot_fraction=1.0", "must be in [0, 0.5] with hot_experts=1, top_k=2"],
    ),  # fmt: skip
    # one study at two points (two spellings of a number); an axis with an empty value
    (
        ["sweep", "llama70b_tp8_decode", "--set", "shape.m=8,16,08"],
        ["--set='shape.m=08'", "the same study as the point shape.m=8"],
    ),
    (["sweep", "llama70b_tp8_decode", "--set", "shape.m=8,"], ["--set shape.m='8,'", "none empty"]),
    (
        [
            "sweep",
            "llama70b_tp8_decode",
            "--set",
            "shape.m=" + ",".join(map(str, range(1, 102))),
            "--set",
            "shape.n=" + ",".join(map(str, range(8, 808, 8))),
        ],
        ["--set='101 x 100 = 10100 points'", "at most 10000 points"],
    ),  # fmt: skip
    (["sweep", "llama70b_tp8_decode", "--out", "{t}/done"], ["--out=", "not empty"]),
    (["run", "llama70b_tp8_decode", "--out", "{t}/afile"], ["--out=", "is a file"]),
    (["run", "llama70b_tp8_decode", "--out", "{t}/done"], ["--out=", "not empty"]),
    (["run", "llama70b_tp8_decode", "--out", "{t}/mine", "--overwrite"], ["did not write"]),
    (["calibrate", "--out", "{t}/afile"], ["--out=", "exists", "--overwrite"]),
    (["calibrate", "--out", "{t}/adir"], ["--out=", "is a folder"]),
    (["calibrate", "--out", "{t}/afile/x.yaml"], ["--out=", "not a folder"]),
    (["calibrate", "--name", " "], ["--name=' '", "non-empty"]),
    # an empty name is a name given, not the default's
    (["validate-model", "--calibrate", "--name", ""], ["--name=''", "non-empty"]),
    (["validate-model", "--calibrate", "--name", " "], ["--name=' '", "non-empty"]),
    (["validate-model", "--calibrate", "--out", "{t}/afile"], ["--out=", "exists"]),
    (["validate-model", "--out", "{t}/new.yaml"], ["--out=", "needs --calibrate"]),
    (["run", "llama70b_tp8_decode", "--name", "x"], ["--name='x'", "needs --calibrate"]),
    (["run", "llama70b_tp8_decode", "--fits", "2"], ["--fits=2", "needs --calibrate"]),
    (["run", "llama70b_tp8_decode", "--reps", "3"], ["--reps=3", "needs --calibrate"]),
    (["run", "llama70b_tp8_decode", "--calibrate", "{t}/f.yaml", "--name", ""], ["--name=''"]),
    (
        ["run", "llama70b_tp8_decode", "--out", "{t}/new", "--calibrate", "{t}/afile"],
        ["--calibrate=", "exists", "--overwrite"],
    ),
    (
        ["run", "llama70b_tp8_decode", "--out", "{t}/new", "--calibrate", "{t}/adir"],
        ["--calibrate=", "is a folder"],
    ),
    (
        ["run", "llama70b_tp8_decode", "--calibrate", "x.yaml", "--reps", "0"],
        ["--reps", "[1, 1000]"],
    ),
    (["report", "{t}/done", "--out", "{t}/afile"], ["--out=", "not a folder"]),
    # a folder the permissions allow (root) but where nothing can be made: found before work
    (
        ["simulate", "llama70b_tp8_decode", "--out", "/proc/mc2sim"],
        ["--out='/proc/mc2sim'", "/proc"],
    ),
    (["sweep", "llama70b_tp8_decode", "--out", "/proc/mc2sim"], ["--out='/proc/mc2sim'", "/proc"]),
    (["run", "llama70b_tp8_decode", "--out", "/proc/mc2sim"], ["--out='/proc/mc2sim'", "/proc"]),
    (["calibrate", "--out", "/proc/mc2sim.yaml"], ["--out='/proc/mc2sim.yaml'", "/proc"]),
    (["report", "{t}/done", "--out", "/proc/mc2sim"], ["--out='/proc/mc2sim'", "/proc"]),
    # results folders that cannot be trusted
    (["report", "{t}/absent"], ["directory=", "no such folder"]),
    (["report", "{t}/adir"], ["directory=", "manifest.json is missing"]),
    (["report", "{t}/incomplete"], ["directory=", "incomplete", "complete.json"]),
    (["report", "{t}/cut"], ["directory=", "tasks.csv ends in the middle of a row"]),
    (["report", "{t}/fifo_tasks"], ["directory=", "tasks.csv is not a regular file"]),
    (["report", "{t}/fifo_trace"], ["directory=", "trace.json is not a regular file"]),
    (["report", "{t}/strings"], ["summary.runs[0].metrics", "total_s='fast'", "number"]),
    (["report", "{t}/mixed"], ["directory=", "summary.json"]),
    (["report", "{t}/done", "{t}/absent"], ["absent'", "no such folder"]),
    # scripts and options
    (["exec", "{t}/absent.py"], ["script=", "no such file"]),
    (["exec", "{t}/adir"], ["script=", "not a file"]),
    (["exec", "{t}/syntax.py"], ["syntax.py'", "is not valid Python: invalid syntax (line 2)"]),
    (["exec", "{t}/latin1.py"], ["latin1.py'", "is not valid Python", "can't decode byte 0xe9"]),
    (["exec", "--timeout", "0", "{t}/absent.py"], ["--timeout", "'0'", "> 0"]),
    (["run", "llama70b_tp8_decode", "--timeout", "-5"], ["--timeout", "'-5'", "> 0"]),
    (["run", "llama70b_tp8_decode", "--timeout", "nan"], ["--timeout", "'nan'", "finite"]),
    (["calibrate", "--timeout", "inf"], ["--timeout", "'inf'", "finite"]),
    (["validate-model", "--timeout", "soon"], ["--timeout", "'soon'", "seconds"]),
    (["calibrate", "--reps", "0"], ["--reps", "0", "must be in [1, 1000]"]),
    (["calibrate", "--reps", "99999999999999"], ["--reps", "must be in [1, 1000]"]),
    (["calibrate", "--fits", "0"], ["--fits", "0", "must be in [1, 10] (fits made)"]),
    (["calibrate", "--fits", "two"], ["--fits", "'two'", "whole number"]),
    (["validate-model", "--calibrate", "--fits", "11"], ["--fits", "11", "must be in [1, 10]"]),
    (["simulate", "llama70b_tp8_decode", "--set", "repetitions=10001"], ["in [1, 10000]"]),
    (["validate-model", "--reps", "many"], ["--reps", "'many'", "whole number"]),
    (["simulate"], ["scenario", "required"]),
    (["frobnicate"], ["invalid choice", "'frobnicate'"]),
    # an unknown flag is reported by the command it was given to, with that command's help
    (["calibrate", "--bogus"], ["unrecognized arguments: --bogus", "see mc2sim calibrate --help"]),
    (
        ["simulate", "llama70b_tp8_decode", "--frobnicate", "1"],
        ["unrecognized arguments: --frobnicate 1", "see mc2sim simulate --help"],
    ),
    (["info", "--backend", "carrier-pigeon"], ["--backend", "'carrier-pigeon'", "invalid choice"]),
    # check-counts: the rules of mc2sim.invariants.check_counts
    (["check-counts", "{t}/absent.json"], ["absent.json'", "cannot be read"]),
    (["check-counts", "{t}/adir"], ["adir'", "must be a regular file"]),
    (["check-counts", "{t}/c_nonutf8.json"], ["c_nonutf8.json=", "not UTF-8"]),
    (["check-counts", "{t}/c_not_json.json"], ["c_not_json.json=", "must be JSON"]),
]
CASES += [
    # limit profiles: strict refuses a hardware limit; what-if still refuses semantic ones
    (
        ["simulate", "seed_gmm_alltoallv_ep4", "--ranks", "1024", "--no-plots"],
        ["--ranks=1024", "e * ep_world_size must be in [1, 256]"],
    ),
    (
        [
            "simulate",
            "seed_gmm_alltoallv_ep4",
            "--what-if",
            "--set",
            "shape.top_k=9",
            "--ranks",
            "1",
            "--no-plots",
        ],
        ["--ranks=1", "top_k (9) must be <= experts_per_rank"],
    ),
    (
        ["sweep", "seed_gmm_alltoallv_ep4", "--what-if", "--set", "shape.h1=0,64", "--no-plots"],
        ["shape.h1", "must be"],
    ),
    (["run", "seed_gmm_alltoallv_ep4", "--set", "limits=what-if"], ["limits='what-if'", "strict"]),
    (
        ["simulate", "seed_gmm_alltoallv_ep4", "--set", "limits=lenient", "--no-plots"],
        ["--set limits='lenient'", "must be one of 'strict', 'what-if'"],
    ),
    (
        ["sweep", "seed_gmm_alltoallv_ep4", "--real", "--what-if", "--no-plots"],
        ["--what-if=True", "is for simulated sweeps"],
    ),
]
CASES += [
    (["check-counts", f"{{t}}/{name}.json"], fragments)
    for name, fragments in [
        ("c_neg", ["send_counts[0][1]=-2", ">= 0"]),
        ("c_frac", ["send_counts[0][1]=2.5", "integers"]),
        ("c_bool", ["recv_counts[0][0]=True", "integers"]),
        ("c_1e30", ["send_counts[0][0]=1e+30", "integers"]),
        ("c_big_int", ["send_counts[0][0]=1000000000000000000000000000000", "fit in int64"]),
        ("c_nan", ["send_counts[0][0]=nan", "integers"]),
        ("c_text", ["send_counts[0][0]='1'", "integers"]),
        ("c_e_frac", ["experts_per_rank=1.5", "int >= 1"]),
        ("c_e_zero", ["experts_per_rank=0", "int >= 1"]),
        ("c_e_bool", ["experts_per_rank=True", "int >= 1"]),
        ("c_extra", ["c_extra.json: recv_count=[[1, 3], [2, 4]]", "is an unknown key"]),
        ("c_twice", ["c_twice.json='not JSON'", "the key 'recv_counts' is given twice"]),
        ("c_e_text", ["experts_per_rank='1'", "int >= 1"]),
        ("c_ragged", ["len(send_counts[1])=1", "= 2"]),
        ("c_shape", ["len(send_counts[0])=2", "= 4"]),
        ("c_rows", ["len(recv_counts)=1", "ranks of send_counts (2)"]),
        ("c_row_int", ["send_counts[0]=1", "list of counts"]),
        ("c_empty", ["send_counts=[]", "non-empty"]),
        ("c_nested", ["send_counts[0][0]=[1]", "integers"]),
        ("c_no_key", ["recv_counts=None", "is missing"]),
        ("c_list", ["c_list.json='list'", "must be JSON"]),
        ("c_deep", ["c_deep.json=", "must be JSON"]),
    ]
]


def _ids() -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for argv, _ in CASES:
        name = "-".join(a.replace("{t}/", "").strip("-") for a in argv)[:60]
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return ids


def test_the_table_is_large() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize(("argv", "fragments"), CASES, ids=_ids())
def test_a_bad_input_is_one_line_and_exit_status_2(
    argv: list[str], fragments: list[str], files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("{t}", str(files)) for a in argv]
    status = main(args)
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    (line,) = lines
    command = args[0] if args[0] in _COMMANDS else ""
    assert line.startswith(f"mc2sim {command}:".replace(" :", ":")), line
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment.replace("{t}", str(files)) in line, line
    assert captured.out == ""


_COMMANDS = (
    "info", "run", "simulate", "sweep", "report", "check-counts", "calibrate",
    "validate-model", "exec",
)  # fmt: skip


def test_exec_compiles_a_source_and_leaves_zip_applications_to_runpy(tmp_path: Path) -> None:
    import zipfile

    from mc2sim.cli import _check_source
    from mc2sim.errors import ParamInvalidError

    app = tmp_path / "app.pyz"
    with zipfile.ZipFile(app, "w") as archive:
        archive.writestr("__main__.py", "print('ran')\n")
    _check_source(app, str(app))  # bytes no compiler takes, which runpy runs
    deep = tmp_path / "deep.py"
    deep.write_text("x = " + "(" * 100_000 + ")" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(ParamInvalidError, match="is not valid Python"):
        _check_source(deep, str(deep))
