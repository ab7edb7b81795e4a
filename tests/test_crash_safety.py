"""SIGKILL at every step of `new` and `remove`, in both modes: after the next run's recovery the tree is exactly
as it was before or exactly as the command leaves it, with no temporary left anywhere."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot

from lora_scaffold.cli import main
from lora_scaffold.workflow import recover_interrupted


pytestmark = pytest.mark.slow  # a quick local run: python -m pytest -m 'not slow'


TESTS = Path(__file__).resolve().parent
DRIVER = TESTS / "crash_driver.py"


def run_killed(step: int, *arguments: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(DRIVER), str(step), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300).returncode


def kill_at_every_step(arguments: list[str], root: Path, fresh, before: dict, after: dict) -> int:
    """Kill `arguments` at step 1, 2, ... until a run completes; return how many steps there were."""
    step = 0
    while True:
        step += 1
        fresh()
        code = run_killed(step, *arguments)
        if code == 0:
            assert snapshot(root) == after
            return step - 1
        assert code == -signal.SIGKILL, code
        note = recover_interrupted(root, dry_run=False)
        state = snapshot(root)
        assert state in (before, after), (step, sorted(set(state) ^ set(after)))
        assert not [name for name in state if "tmp" in name.rsplit("/", 1)[-1]], step
        assert note or state == before


def test_plugin_new_survives_a_kill_at_every_step(tmp_path):
    out = tmp_path / "out"
    arguments = ["new", "torch.nn.Conv1d", "-o", str(out)]

    def fresh():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "lora_conv1d.py").write_text("# an earlier version\n")

    fresh()
    before = snapshot(out)
    assert main([*arguments, "--force"]) == 0
    after = snapshot(out)
    steps = kill_at_every_step([*arguments, "--force"], out, fresh, before, after)
    assert steps == 1 + 3 + 1 + 3  # prepare, three temporaries, commit, three renames


def test_patch_new_and_remove_survive_a_kill_at_every_step(pristine, tmp_path):
    checkout = tmp_path / "peft"
    new = ["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]
    remove = ["remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]
    shutil.copytree(pristine, tmp_path / "patched")
    assert main([*new[:-1], str(tmp_path / "patched")]) == 0
    before, after = snapshot(pristine), snapshot(tmp_path / "patched")

    def copy_of(tree):
        def fresh():
            shutil.rmtree(checkout, ignore_errors=True)
            shutil.copytree(tree, checkout)

        return fresh

    # prepare, nine temporaries (layer, tests, record, layer.py, __init__.py, battery, model.py, .gitignore, the
    # pull-request description), commit, nine renames; remove: four files restored, five deleted.
    assert kill_at_every_step(new, checkout, copy_of(pristine), before, after) == 1 + 9 + 1 + 9
    assert kill_at_every_step(remove, checkout, copy_of(tmp_path / "patched"), after, before) == 1 + 4 + 1 + 4 + 5
