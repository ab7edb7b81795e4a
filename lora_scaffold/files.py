"""Stage 5: decide what each generated file does to the disk, then apply all of it or none of it."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold import journal
from lora_scaffold.errors import WriteError


CREATE, IDENTICAL, UPDATE, OVERWRITE, CONFLICT, DELETE = (
    "create",
    "identical",
    "update",
    "overwrite",
    "conflict",
    "delete",
)


@dataclass(frozen=True)
class GeneratedFile:
    """A file a stage produced, by its path relative to the output folder, before anything is written."""

    path: str
    text: str


@dataclass(frozen=True)
class FileChange:
    path: Path
    status: str
    new_text: str | None
    old_text: str | None

    @property
    def writes(self) -> bool:
        return self.status in (CREATE, UPDATE, OVERWRITE)

    @property
    def changes_disk(self) -> bool:
        return self.writes or self.status == DELETE

    def diff(self) -> str:
        old, new = _diff_lines(self.path, self.old_text), _diff_lines(self.path, self.new_text)
        old_name = str(self.path) if self.old_text is not None else "/dev/null"
        new_name = str(self.path) if self.new_text is not None else "/dev/null"
        return "".join(difflib.unified_diff(old, new, old_name, new_name))


def _diff_lines(path: Path, text: str | None) -> list[str]:
    """The text's lines; a JSON object's as one `key: value` line a value, its multi-line strings (the generation
    record's pristine copies of whole files) spread over lines, so that a one-line change diffs as one line."""
    if text is None:
        return []
    try:
        data = json.loads(text) if path.suffix == ".json" else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return text.splitlines(keepends=True)
    return list(_json_lines(data, ""))


def _json_lines(value, key: str):
    if isinstance(value, dict) and value:
        for name, item in value.items():
            yield from _json_lines(item, f"{key}.{name}" if key else name)
    elif isinstance(value, str) and "\n" in value:
        yield f"{key}: |\n"
        yield from (f"    {line}\n" for line in value.splitlines())
    else:
        yield f"{key}: {json.dumps(value)}\n"


def plan_changes(
    files: tuple[GeneratedFile, ...], out_dir: Path, force: bool, updatable: frozenset[str] = frozenset()
) -> tuple[FileChange, ...]:
    """One change a file. Paths in `updatable` are existing files the run may change (status update): files it
    edits, or files lora-scaffold wrote and nobody edited since. Any other existing file with other content is a
    conflict unless forced."""
    changes = []
    for generated in files:
        path = out_dir / generated.path
        old = _read_regular(path)
        if old is None:
            status = CREATE
        elif old == generated.text:
            status = IDENTICAL
        elif generated.path in updatable:
            status = UPDATE
        else:
            status = OVERWRITE if force else CONFLICT
        changes.append(FileChange(path, status, generated.text, old))
    return tuple(changes)


def plan_deletions(paths: list[Path]) -> tuple[FileChange, ...]:
    return tuple(FileChange(path, DELETE, None, _read_regular(path)) for path in paths if path.exists())


def _read_regular(path: Path) -> str | None:
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise WriteError(f"{path} exists and is not a regular file; refusing to replace it")
    if not path.exists():
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise WriteError(f"{path} exists and is not UTF-8 text; refusing to replace it") from None


def refuse_conflicts(changes: tuple[FileChange, ...]) -> None:
    conflicts = [str(c.path) for c in changes if c.status == CONFLICT]
    if conflicts:
        raise WriteError(f"{', '.join(conflicts)} already exists with other content; pass --force to overwrite it")


def apply_changes(changes: tuple[FileChange, ...], root: Path) -> None:
    """Write and delete all of `changes` (paths below `root`) or none of them, even across a crash."""
    refuse_conflicts(changes)
    writes = [(c.path, c.new_text, c.old_text, _mode(c.path)) for c in changes if c.writes]
    deletes = [(c.path, c.old_text) for c in changes if c.status == DELETE]
    if writes or deletes:
        journal.apply(root, writes, deletes)


def _mode(path: Path) -> int | None:
    """A replaced file keeps its mode; a new one gets what the umask gives (None)."""
    return path.stat().st_mode & 0o7777 if path.exists() else None
