import filecmp
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from lora_scaffold.peft_release import CONFIG_API, installed_peft


REPO = Path(__file__).resolve().parent.parent
# The peft sdist patch mode is tested on: the installed peft's own release (CI installs the newest, which is what
# users patch), 0.21.2 for a peft built from source, and 0.17.1 where peft < 0.19 is installed (CI's second
# environment), so that PEFT's own tests run with the packages they expect.
_INSTALLED = importlib.metadata.version("peft")
if installed_peft().api != CONFIG_API:
    PEFT_VERSION = "0.17.1"
elif re.fullmatch(r"\d+\.\d+\.\d+", _INSTALLED):
    PEFT_VERSION = _INSTALLED
else:
    PEFT_VERSION = "0.21.2"
IGNORED = ["__pycache__", ".pytest_cache", ".benchmarks", ".ruff_cache"]


# Every test file in one group, a marker of the same name (`python -m pytest -m unit`); a new file must join one.
GROUPS = {
    # One stage or one module, in memory: nothing generated is run.
    "unit": (
        *("test_analyse", "test_introspect", "test_resolve", "test_render", "test_files", "test_names"),
        *("test_import_blocks", "test_layout", "test_patch_transforms", "test_installed_peft_api", "test_workflow"),
        *("test_cli", "test_json_output", "test_bad_inputs", "test_factored", "test_mutants"),
    ),
    # A layer generated, then its suite or PEFT's numbers run on it.
    "generated": (
        *("test_end_to_end", "test_experts", "test_parity", "test_real_layers", "test_random_modules"),
        *("test_rnn_weights", "test_verify", "test_quantized", "test_mutation"),
    ),
    # Patch mode on a real peft source tree.
    "patch": ("test_patch_checkout", "test_update", "test_crash_safety"),
    # Generated layers among other software: models, processes, hooks, benchmarks.
    "integration": (
        *("test_scan", "test_audit", "test_model_zoo", "test_distributed", "test_ecosystem", "test_zero3_standin"),
        *("test_integration", "test_benchmarks"),
    ),
}
GROUP_OF = {stem: group for group, stems in GROUPS.items() for stem in stems}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.stem not in GROUP_OF:
            raise pytest.UsageError(f"{item.path.name} is in no group: add it to tests/conftest.py:GROUPS")
        item.add_marker(GROUP_OF[item.path.stem])
    if config.pluginmanager.hasplugin("xdist"):  # CI's older-PEFT environment runs without it
        _schedule_for_workers(items)


def _schedule_for_workers(items) -> None:
    """With pytest-xdist (`-n auto --dist loadgroup`, as CI runs): the tests sharing what a module fixture builds go
    to one worker, so that it is built once; every other test is handed out alone. Slow tests start first, so that
    no worker is left with one long test at the end."""
    for item in items:
        if _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _shares_a_module_fixture(item) -> bool:
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(chain[-1].scope in ("package", "module", "class") for chain in definitions.values() if chain)


@pytest.fixture
def import_path(monkeypatch):
    """Make folders importable for one test (generated modules live in tmp folders)."""

    def add(*folders):
        for folder in folders:
            monkeypatch.syspath_prepend(str(folder))

    return add


@pytest.fixture(autouse=True)
def _forget_generated_modules():
    """Generated modules share names across tests (lora_linear, ...): import each test's own copy."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("lora_", "test_lora_")):
            del sys.modules[name]


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """An unmodified peft sdist (from LORA_SCAFFOLD_PEFT_SDIST_0_22_0 and the like, else downloaded once) with
    tests/__init__.py,
    which PEFT's tests need to run."""
    given = os.environ.get(f"LORA_SCAFFOLD_PEFT_SDIST_{PEFT_VERSION.replace('.', '_')}")
    root = tmp_path_factory.mktemp("pristine")
    if given:
        shutil.copytree(given, root / "peft")
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-scaffold"
        archive = cache / f"peft-{PEFT_VERSION}.tar.gz"
        if not archive.exists():  # downloaded aside, then moved: test workers may both get here first
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            cache.mkdir(parents=True, exist_ok=True)
            aside = Path(tempfile.mkdtemp(dir=cache))
            subprocess.run([*command, f"peft=={PEFT_VERSION}", "-d", str(aside)], check=True)
            os.replace(aside / archive.name, archive)
            shutil.rmtree(aside)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        (root / f"peft-{PEFT_VERSION}").rename(root / "peft")
    (root / "peft" / "tests" / "__init__.py").touch()
    return root / "peft"


@pytest.fixture
def checkout(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "peft", ignore=shutil.ignore_patterns(*IGNORED))
    return tmp_path / "peft"


def same_tree(left: Path, right: Path) -> bool:
    comparison = filecmp.dircmp(left, right, ignore=IGNORED)
    stack = [comparison]
    while stack:
        current = stack.pop()
        if current.left_only or current.right_only or current.diff_files or current.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(current.left, current.right, current.common_files, shallow=False)
        if mismatch or errors:
            return False
        stack.extend(current.subdirs.values())
    return True


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `root` with its bytes and mode (caches left out)."""
    return {
        path.relative_to(root).as_posix(): (path.read_bytes(), path.stat().st_mode)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not set(path.relative_to(root).parts) & set(IGNORED)
    }
