"""Stage 5: decide what each generated file does to the disk, then apply all of it or none of it."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold.errors import WriteError
from lora_scaffold.render import GeneratedFile


CREATE, IDENTICAL, OVERWRITE, CONFLICT = "create", "identical", "overwrite", "conflict"


@dataclass(frozen=True)
class FileChange:
    path: Path
    status: str
    new_text: str
    old_text: str | None

    @property
    def writes(self) -> bool:
        return self.status in (CREATE, OVERWRITE)

    def diff(self) -> str:
        old = (self.old_text or "").splitlines(keepends=True)
        old_name = str(self.path) if self.old_text is not None else "/dev/null"
        lines = difflib.unified_diff(old, self.new_text.splitlines(keepends=True), old_name, str(self.path))
        return "".join(lines)


def plan_changes(files: tuple[GeneratedFile, ...], out_dir: Path, force: bool) -> tuple[FileChange, ...]:
    changes = []
    for generated in files:
        path = out_dir / generated.path
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise WriteError(f"{path} exists and is not a regular file; refusing to replace it")
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old is None:
            status = CREATE
        elif old == generated.text:
            status = IDENTICAL
        else:
            status = OVERWRITE if force else CONFLICT
        changes.append(FileChange(path, status, generated.text, old))
    return tuple(changes)


def refuse_conflicts(changes: tuple[FileChange, ...]) -> None:
    conflicts = [str(c.path) for c in changes if c.status == CONFLICT]
    if conflicts:
        raise WriteError(f"{', '.join(conflicts)} already exists with other content; pass --force to overwrite it")


def apply_changes(changes: tuple[FileChange, ...]) -> None:
    """Stage every file next to its destination, then rename them all; on any failure restore what was there."""
    refuse_conflicts(changes)
    created_dirs: list[Path] = []
    staged: list[tuple[Path, FileChange]] = []
    replaced: list[FileChange] = []
    try:
        for change in changes:
            if change.writes:
                created_dirs += _make_parents(change.path.parent)
                staged.append((_stage(change), change))
        for temporary, change in staged:
            os.replace(temporary, change.path)
            replaced.append(change)
    except OSError as exc:
        _roll_back(replaced, [t for t, c in staged if c not in replaced], created_dirs)
        raise WriteError(
            f"writing {exc.filename or 'the output'} failed ({exc.strerror}); nothing was changed"
        ) from exc


def _make_parents(directory: Path) -> list[Path]:
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _stage(change: FileChange) -> Path:
    handle, name = tempfile.mkstemp(dir=change.path.parent, prefix=f".{change.path.name}.", suffix=".tmp")
    with os.fdopen(handle, "wb") as stream:
        stream.write(change.new_text.encode("utf-8"))
    return Path(name)


def _roll_back(replaced: list[FileChange], leftovers: list[Path], created_dirs: list[Path]) -> None:
    for change in replaced:
        if change.old_text is None:
            change.path.unlink(missing_ok=True)
        else:
            change.path.write_bytes(change.old_text.encode("utf-8"))
    for temporary in leftovers:
        temporary.unlink(missing_ok=True)
    for directory in created_dirs:
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
