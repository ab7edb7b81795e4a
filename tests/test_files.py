import json
import os
from pathlib import Path

import pytest

from lora_scaffold import journal
from lora_scaffold.errors import WriteError
from lora_scaffold.files import FileChange, GeneratedFile, apply_changes, plan_changes


GENERATED = (GeneratedFile("lora_x.py", "layer\n"), GeneratedFile("test_lora_x.py", "tests\n"))


def test_statuses(tmp_path):
    (tmp_path / "lora_x.py").write_text("layer\n")
    (tmp_path / "test_lora_x.py").write_text("mine\n")
    statuses = [c.status for c in plan_changes(GENERATED, tmp_path, force=False)]
    assert statuses == ["identical", "conflict"]
    assert [c.status for c in plan_changes(GENERATED, tmp_path, force=True)] == ["identical", "overwrite"]


def test_a_records_copy_of_a_file_diffs_line_by_line():
    """The generation record keeps whole files as JSON strings: a one-line change of one shows as that line."""
    layer = "".join(f"line {i}\n" for i in range(50))
    old = json.dumps({"format": 1, "pristine": {"lora_x.py": layer}}, indent=1)
    new = json.dumps({"format": 1, "pristine": {"lora_x.py": layer.replace("line 7\n", "line seven\n")}}, indent=1)
    diff = FileChange(Path(".lora-scaffold/lora_x.json"), "update", new, old).diff()
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-    line 7", "+    line seven"], diff


def test_conflicts_are_refused_and_named(tmp_path):
    (tmp_path / "test_lora_x.py").write_text("mine\n")
    with pytest.raises(WriteError, match=r"test_lora_x.py already exists with other content; pass --force"):
        apply_changes(plan_changes(GENERATED, tmp_path, force=False), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_lora_x.py"]
    assert (tmp_path / "test_lora_x.py").read_text() == "mine\n"


def test_writes_create_missing_folders(tmp_path):
    apply_changes(plan_changes(GENERATED, tmp_path / "a" / "b", force=False), tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / "lora_x.py").read_text() == "layer\n"


def test_a_failure_between_two_renames_leaves_the_disk_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "new_folder"
    real_replace = os.replace
    calls = []

    def fail_second(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(journal.os, "replace", fail_second)
    with pytest.raises(WriteError, match="nothing was changed"):
        apply_changes(plan_changes(GENERATED, out, force=False), out)
    assert not out.exists()


def test_a_failed_overwrite_restores_the_old_content(tmp_path, monkeypatch):
    (tmp_path / "lora_x.py").write_text("old layer\n")
    real_replace = os.replace

    def fail_on_tests(source, destination):
        if str(destination).endswith("test_lora_x.py"):
            raise OSError(13, "Permission denied", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(journal.os, "replace", fail_on_tests)
    with pytest.raises(WriteError):
        apply_changes(plan_changes(GENERATED, tmp_path, force=True), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_x.py"]
    assert (tmp_path / "lora_x.py").read_text() == "old layer\n"


def test_symlinks_and_folders_are_never_replaced(tmp_path):
    (tmp_path / "elsewhere.py").write_text("x")
    (tmp_path / "lora_x.py").symlink_to(tmp_path / "elsewhere.py")
    with pytest.raises(WriteError, match="not a regular file"):
        plan_changes(GENERATED, tmp_path, force=True)
