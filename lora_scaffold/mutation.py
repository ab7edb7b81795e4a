"""Mutation testing of generated suites (issue 23): each one-change mutant of a generated layer (lora_scaffold/mutants.py)
runs against the layer's own suite, and must make it fail.

    python -m lora_scaffold.mutation generated_examples/bilinear [more example folders] [--jobs 2]

Mutants run in processes forked from a server that imported torch, peft and pytest once (a fresh interpreter per
mutant costs seconds), one mutant per process so that each imports its own layer module, and pytest stops at the
first failure (`-x`). A mutant that runs past the time limit is stopped by an alarm inside its process: a hanging
suite fails a user's CI too, so it counts as caught. Prints the score and every surviving mutant; exits 1 when one
survives that the example's `mutation.json` (beside the layer: {"Class.method: change": "why it changes no
behaviour"}) does not explain, or when that file lists a mutant the suite catches or the mutator no longer makes."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold.mutants import OPERATORS, Mutant, layer_classes, mutants


TIME_LIMIT = 120  # seconds per mutant; the unmutated suites take a few
PRELOAD = ["torch", "peft", "pytest", "lora_scaffold.mutants"]


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    caught: bool
    how: str  # "failed", "timed out", "survived"


def example_files(folder: Path) -> tuple[Path, Path]:
    """The layer module and its suite in a generated folder."""
    suites = sorted(folder.glob("test_lora_*.py"))
    if len(suites) != 1:
        raise SystemExit(f"{folder}: expected one test_lora_*.py, found {len(suites)}")
    layer = folder / suites[0].name.removeprefix("test_")
    if not layer.is_file():
        raise SystemExit(f"{folder}: {layer.name} is missing")
    return layer, suites[0]


def run_suite(folder: str) -> int:
    """In a forked process: the suite in `folder`, quiet, stopping at the first failure; pytest's exit code."""
    import os
    import signal

    import pytest

    def out_of_time(signum, frame):
        raise TimeoutError("the mutant's suite ran past the time limit")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(TIME_LIMIT)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.chdir(folder)
    sys.path.insert(0, folder)
    # Only the exit code counts: no plugins of the environment, no rewritten asserts (their messages), no garbage
    # collected for unraisable-exception warnings; together they cost three times the tests' own time.
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    quiet = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--assert=plain", "-W", "ignore"]
    try:
        return int(pytest.main([*quiet, folder]))
    except TimeoutError:
        return -1


def run(example: Path, jobs: int, operators: tuple[str, ...] = OPERATORS) -> tuple[list[Outcome], int]:
    """Every mutant the operators make of the example's layer, against its suite; also the number made."""
    layer, suite = example_files(example)
    source = layer.read_text()
    made = mutants(source, layer_classes(source), operators)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as scratch:
        folders = []
        for number, mutant in enumerate([None, *made]):
            folder = Path(scratch) / f"mutant{number}"
            folder.mkdir()
            shutil.copy(suite, folder / suite.name)
            (folder / layer.name).write_text(source if mutant is None else mutant.source)
            folders.append(str(folder))
        with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
            codes = list(pool.map(run_suite, folders))
    if codes[0] != 0:
        raise SystemExit(f"{example}: the unmutated suite fails (pytest exit {codes[0]}): nothing can be measured")
    outcomes = [
        Outcome(mutant, code != 0, "timed out" if code == -1 else "failed" if code else "survived")
        for mutant, code in zip(made, codes[1:])
    ]
    return outcomes, len(made)


def equivalent_mutants(example: Path) -> dict[str, str]:
    """The example's surviving mutants shown equivalent: `Mutant.key` -> why (mutation.json, optional)."""
    path = example / "mutation.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_scaffold.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("examples", nargs="+", type=Path, help="folders holding a generated layer and its suite")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--operator", action="append", choices=OPERATORS, help="only these operators (repeatable)")
    options = parser.parse_args(argv)
    unexplained = 0
    for example in options.examples:
        outcomes, made = run(example, options.jobs, tuple(options.operator or OPERATORS))
        known = equivalent_mutants(example)
        survivors = [o for o in outcomes if not o.caught]
        explained = [o for o in survivors if o.mutant.key in known]
        scored = made - len(explained)
        caught = sum(o.caught for o in outcomes)
        print(f"{example}: {caught} of {scored} non-equivalent mutants caught ({len(explained)} equivalent)")
        for outcome in survivors:
            key = f"{outcome.mutant.where}: {outcome.mutant.change}"
            why = known.get(outcome.mutant.key)
            print(
                f"  {'equivalent' if why else 'SURVIVED'} [{outcome.mutant.operator}] {key}"
                + (f" ({why})" if why else "")
            )
            unexplained += why is None
        # A listed mutant the suite now catches, or one no longer made, means the list no longer tells the truth
        # (with --operator, the others' mutants are not made: only those made are judged).
        listed = set(known) if options.operator is None else set(known) & {o.mutant.key for o in outcomes}
        for key in sorted(listed - {outcome.mutant.key for outcome in survivors}):
            print(f"  STALE {key} is listed in mutation.json but was caught, or not made")
            unexplained += 1
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
