"""Plant each semantic mutation of tests/mutants/mutants.yaml and check the tests catch it.

Usage (``make mutants``)::

    python scripts/mutants.py [--only ID,ID] [--check] [--list FILE]

Every mutant replaces exact snippets (usually one) of one file. The script first checks that every
snippet occurs exactly once (and refuses to run otherwise: code moved by a refactor must be
re-pointed, not silently skipped), copies the tree (git's tracked and untracked, not ignored,
files) into a temporary folder, and checks there that the mutants' tests pass unmutated.
Then, one mutant at a time in that copy (never in the working tree), it applies the
mutation, runs the mutant's tests with pytest, and restores the file. A mutant is caught when
its tests fail; the last line printed is ``mutants caught K/N``. Exit status: 0 when every
mutant was caught, 1 when some survived, 2 when the list or the tree is unusable.

Mutation tools such as mutmut or cosmic-ray generate syntactic mutants (an operator or a
constant at a time) and run the whole suite on each; the mutations here are chosen semantic
bugs (a layout, an index, a formula) with a targeted test selection, so a list of patches
kept beside the tests is the better fit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIST = ROOT / "tests" / "mutants" / "mutants.yaml"
TIMEOUT_S = 600
"""A mutant whose tests run longer than this (a hang) counts as caught, and says so."""


class MutantError(Exception):
    """The mutant list or the tree cannot be used as it is."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Mutant:
    """One semantic mutation and the tests that must catch it."""

    id: str
    """Short unique name."""
    description: str
    """The bug it plants, in words."""
    file: str
    """Path of the mutated file, relative to the repository root."""
    edits: tuple[tuple[str, str], ...]
    """``(old, new)`` replacements, applied in order; each ``old`` is an exact snippet that
    must occur exactly once in ``file`` (one bug may need consistent edits in a few places)."""
    tests: tuple[str, ...]
    """pytest arguments selecting the tests that must fail."""


def load_mutants(path: Path) -> list[Mutant]:
    """Read and validate the mutant list.

    Args:
        path: the YAML list.

    Returns:
        The mutants, in file order.

    Raises:
        MutantError: a missing or malformed entry, or a duplicate id.
    """
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MutantError(f"{path}: cannot read the mutant list ({exc})") from None
    if not isinstance(data, list) or not data:
        raise MutantError(f"{path}: must be a non-empty list of mutants")
    keys = {"id", "description", "file", "old", "new", "tests"}
    mutants: list[Mutant] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not keys <= set(entry) <= keys | {"more"}:
            raise MutantError(
                f"{path}: entry {i} must have the keys {sorted(keys)} (and optionally 'more')"
            )
        tests = entry["tests"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise MutantError(f"{path}: {entry['id']}: tests must be a list of pytest arguments")
        more = entry.get("more", [])
        if not isinstance(more, list) or not all(
            isinstance(e, dict) and set(e) == {"old", "new"} for e in more
        ):
            raise MutantError(f"{path}: {entry['id']}: more must be a list of {{old, new}}")
        edits = [(str(entry["old"]), str(entry["new"]))]
        edits += [(str(e["old"]), str(e["new"])) for e in more]
        mutant = Mutant(
            id=str(entry["id"]),
            description=" ".join(str(entry["description"]).split()),
            file=str(entry["file"]),
            edits=tuple(edits),
            tests=tuple(tests),
        )
        if any(old == new or not old for old, new in mutant.edits):
            raise MutantError(f"{path}: {mutant.id}: old must be non-empty and differ from new")
        if any(m.id == mutant.id for m in mutants):
            raise MutantError(f"{path}: duplicate id {mutant.id}")
        mutants.append(mutant)
    return mutants


def check_snippets(mutants: list[Mutant], root: Path) -> None:
    """Raise unless every mutant's snippet occurs exactly once in its file under ``root``."""
    problems = []
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        text = path.read_text()
        for old, _ in m.edits:
            count = text.count(old)
            if count != 1:
                problems.append(
                    f"{m.id}: the snippet occurs {count} times in {m.file}, not once "
                    f"(re-point it to the code's new place): {old!r}"
                )
    if problems:
        raise MutantError("mutant snippets out of date:\n  " + "\n  ".join(problems))


def copy_tree(root: Path, into: Path) -> None:
    """Copy git's tracked and untracked (not ignored) files of ``root`` into ``into``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        source = root / rel
        if not source.is_file():  # deleted but not yet staged
            continue
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def pytest_run(tree: Path, args: tuple[str, ...]) -> tuple[int, float, str]:
    """Run pytest on ``args`` in ``tree`` (its mc2sim first on the path).

    Returns:
        ``(exit status, seconds, the output's last lines)``; status -1 when it timed out.
    """
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    command += ["-m", "not mpi", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, f"timed out after {TIMEOUT_S} s"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return done.returncode, time.perf_counter() - start, tail


def check_imports_from(tree: Path) -> None:
    """Raise unless ``import mc2sim`` in ``tree`` finds the copy, not an installed one."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    found = subprocess.run(
        [sys.executable, "-c", "import mc2sim; print(mc2sim.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise MutantError(f"the copy's tests would import mc2sim from {found}, not from {tree}")


def union_of_paths(mutants: list[Mutant]) -> list[str]:
    """The test paths (and node ids) the mutants select, their ``-k`` filters left out.

    Every selection is a subset of these, so if they all pass, so does each selection.
    """
    paths: dict[str, None] = {}
    for m in mutants:
        skip = False
        for arg in m.tests:
            if skip:
                skip = False
            elif arg in ("-k", "-m"):
                skip = True
            elif not arg.startswith("-"):
                paths[arg] = None
    return list(paths)


def run(mutants: list[Mutant]) -> int:
    """Check, copy, verify the unmutated tests pass, then try every mutant; return the status."""
    check_snippets(mutants, ROOT)
    with tempfile.TemporaryDirectory(prefix="mc2sim-mutants-") as scratch:
        tree = Path(scratch) / "tree"
        copy_tree(ROOT, tree)
        check_imports_from(tree)
        files = union_of_paths(mutants)
        print(f"checking that {len(files)} test files pass unmutated", flush=True)
        status, seconds, tail = pytest_run(tree, tuple(files))
        if status != 0:
            raise MutantError(
                f"the mutants' tests fail without any mutation (status {status}, "
                f"{seconds:.0f} s):\n{tail}"
            )
        caught = 0
        broken: list[str] = []
        for number, m in enumerate(mutants, 1):
            path = tree / m.file
            original = path.read_text()
            mutated = original
            for old, new in m.edits:
                mutated = mutated.replace(old, new, 1)
            path.write_text(mutated)
            try:
                status, seconds, tail = pytest_run(tree, m.tests)
            finally:
                path.write_text(original)
            if status in (1, -1):
                caught += 1
                verdict = "caught" if status == 1 else "caught (timed out)"
            elif status == 0:
                verdict = "SURVIVED"
            else:  # collection error, usage error, no tests: the mutant itself is unusable
                verdict = f"BROKEN (pytest status {status})"
                broken.append(f"{m.id}:\n{tail}")
            head = f"[{number:2}/{len(mutants)}] {verdict:<9} {m.id} ({seconds:.0f} s)"
            print(f"{head}: {m.description}", flush=True)
        for report in broken:
            print(f"\n{report}", file=sys.stderr)
    print(f"mutants caught {caught}/{len(mutants)}")
    if broken:
        return 2
    return 0 if caught == len(mutants) else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--list", type=Path, default=DEFAULT_LIST, help="the mutant list (YAML)")
    parser.add_argument("--only", default="", help="comma-separated mutant ids to run")
    parser.add_argument(
        "--check", action="store_true", help="only check that every snippet matches once"
    )
    args = parser.parse_args(argv)
    try:
        mutants = load_mutants(args.list)
        if args.only:
            wanted = [w for w in args.only.split(",") if w]
            unknown = sorted(set(wanted) - {m.id for m in mutants})
            if unknown:
                raise MutantError(f"--only: no mutants named {', '.join(unknown)}")
            mutants = [m for m in mutants if m.id in wanted]
        if args.check:
            check_snippets(mutants, ROOT)
            print(f"all {len(mutants)} mutant snippets match exactly once")
            return 0
        return run(mutants)
    except MutantError as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
