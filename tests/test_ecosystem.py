"""lora-scaffold in a user's repository: the pre-commit hook and the CI workflow users copy, each run for real on a
sample repository laid out as a user would have it (fresh environments, nothing of this repository but the
package itself)."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

from lora_scaffold.cli import main
from lora_scaffold.peft_release import installed_peft


pytestmark = pytest.mark.slow  # a quick local run: python -m pytest -m 'not slow'


REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "examples" / "ci" / "lora-layers.yml"


def pinned_environment(tmp_path: Path, **extra: str) -> dict:
    """The environment for installs here: torch pinned to the CPU build this machine has (never a CUDA build)."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    return {**os.environ, "PIP_CONSTRAINT": str(constraints), "PIP_EXTRA_INDEX_URL": "", **extra}


def sample_repository(root: Path) -> Path:
    """A user's repository: its package, and lora_layers/ with a manifest and the layers generated from it."""
    root.mkdir()
    (root / "lora_layers").mkdir()
    manifest = {"peft": installed_peft().version_text, "examples": {"conv1d": {"target": "torch.nn.Conv1d"}}}
    (root / "lora_layers" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert main(["check", str(root / "lora_layers"), "--update"]) == 0
    for command in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "layers"],
    ):
        subprocess.run(["git", *command], cwd=root, check=True)
    return root


def stale(repository: Path) -> Path:
    layer = repository / "lora_layers" / "conv1d" / "lora_conv1d.py"
    layer.write_text(layer.read_text() + "# edited by hand\n")
    return layer


def test_pre_commit_hook_fails_on_stale_layers_and_passes_once_refreshed(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.fail("the pre-commit test installs the hook from this repository's HEAD, and there is none")
    repository = sample_repository(tmp_path / "user")
    hooks = {
        "repos": [{"repo": str(REPO), "rev": head, "hooks": [{"id": "lora-scaffold-check", "args": ["lora_layers"]}]}]
    }
    (repository / ".pre-commit-config.yaml").write_text(yaml.safe_dump(hooks))
    env = pinned_environment(tmp_path, PRE_COMMIT_HOME=str(tmp_path / "pre-commit-home"))
    command = [sys.executable, "-m", "pre_commit", "run", "--all-files"]
    fresh = subprocess.run(command, cwd=repository, capture_output=True, text=True, env=env, timeout=1200)
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    stale(repository)
    failing = subprocess.run(command, cwd=repository, capture_output=True, text=True, env=env, timeout=600)
    assert failing.returncode == 1 and "-# edited by hand" in failing.stdout, failing.stdout[-3000:]
    assert main(["check", str(repository / "lora_layers"), "--update"]) == 0
    passing = subprocess.run(command, cwd=repository, capture_output=True, text=True, env=env, timeout=600)
    assert passing.returncode == 0, passing.stdout[-3000:]


def test_ci_workflow_steps_run_in_a_fresh_environment(tmp_path):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    steps = [step["run"] for step in job["steps"] if "run" in step]
    assert [step["uses"].split("@")[0] for step in job["steps"] if "uses" in step] == [
        "actions/checkout",
        "actions/setup-python",
    ]
    repository = sample_repository(tmp_path / "user")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    # The job's own variables, with lora-scaffold installed from this checkout instead of its git URL.
    env = pinned_environment(tmp_path, **{**job["env"], "LORA_SCAFFOLD": str(REPO), "PIP_EXTRA_INDEX_URL": ""})
    env["PATH"] = f"{environment / 'bin'}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    for step in steps:
        result = subprocess.run(
            ["bash", "-e", "-c", step], cwd=repository, capture_output=True, text=True, env=env, timeout=1200
        )
        assert result.returncode == 0, (step, result.stdout[-3000:], result.stderr[-3000:])
    assert " passed" in result.stdout
    stale(repository)
    check = next(step for step in steps if "lora-scaffold check" in step)
    failing = subprocess.run(["bash", "-e", "-c", check], cwd=repository, capture_output=True, text=True, env=env)
    assert failing.returncode == 1 and "-# edited by hand" in failing.stdout
