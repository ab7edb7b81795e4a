"""Generated suites run as users' CI runs them: `pytest` in a process of its own, with nothing of the tests' state.

A fresh interpreter spends about 5 of its seconds importing torch, peft and transformers; the suites here are forked
instead from a server process that imported those three once (multiprocessing's forkserver, preloaded). Each suite
still gets a process of its own, the working folder, environment and import path a fresh `python -m pytest` would
have, and no module of the tests' process.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path


PRELOADED = ["torch", "peft", "transformers"]
TIMEOUT = 1800

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOADED)


def run_pytest(arguments: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m pytest ARGUMENTS` in `cwd` with `env`: its exit code and its output (stdout and stderr)."""
    output = Path(cwd) / f".pytest-output-{os.getpid()}-{id(arguments)}.txt"
    # Plugins among the preloaded modules (anyio) were imported before pytest could rewrite their asserts.
    arguments = ["-W", "ignore::pytest.PytestAssertRewriteWarning", *arguments]
    process = _context.Process(target=_pytest_main, args=(arguments, str(cwd), env, str(output)))
    process.start()
    process.join(TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()
    text = output.read_text(errors="replace") if output.exists() else ""
    output.unlink(missing_ok=True)
    return subprocess.CompletedProcess(["pytest", *arguments], process.exitcode, text, "")


def _pytest_main(arguments: list[str], cwd: str, env: dict[str, str], output: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # As `python -m pytest` starts: the working folder, PYTHONPATH, then the interpreter's own folders.
    installed = [p for p in sys.path if p.startswith((sys.prefix, sys.base_prefix))]
    sys.path[:] = [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep)), *installed]
    descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    import pytest

    code = pytest.main(arguments)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))
