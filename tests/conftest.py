import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent


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
