"""Stage 5: decide what each generated file does to the disk, then apply all of it or none of it."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold.errors import WriteError
from lora_scaffold.render import GeneratedFile


CREATE, IDENTICAL, UPDATE, OVERWRITE, CONFLICT, DELETE = (
    "create",
    "identical",
    "update",
    "overwrite",
    "conflict",
    "delete",
)


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
        old = (self.old_text or "").splitlines(keepends=True)
        new = (self.new_text or "").splitlines(keepends=True)
        old_name = str(self.path) if self.old_text is not None else "/dev/null"
        new_name = str(self.path) if self.new_text is not None else "/dev/null"
        return "".join(difflib.unified_diff(old, new, old_name, new_name))


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


def apply_changes(changes: tuple[FileChange, ...]) -> None:
    """Stage every file next to its destination, then rename them all; on any failure restore what was there."""
    refuse_conflicts(changes)
    created_dirs: list[Path] = []
    staged: list[tuple[Path, FileChange]] = []
    done: list[tuple[Path | None, FileChange]] = []
    try:
        for change in changes:
            if change.writes:
                created_dirs += _make_parents(change.path.parent)
                staged.append((_stage(change.path, change.new_text), change))
        for change in changes:
            if change.status == DELETE:
                backup = _stage(change.path, change.old_text)
                os.replace(change.path, backup)
                done.append((backup, change))
        for temporary, change in staged:
            os.replace(temporary, change.path)
            done.append((None, change))
    except OSError as exc:
        _roll_back(done, [t for t, c in staged if (None, c) not in done], created_dirs)
        raise WriteError(
            f"writing {exc.filename or 'the output'} failed ({exc.strerror}); nothing was changed"
        ) from exc
    for backup, change in done:
        if backup is not None:
            backup.unlink()
            _remove_if_empty(change.path.parent)


def _remove_if_empty(directory: Path) -> None:
    """A folder a deletion left empty goes too, so that `remove` leaves no trace."""
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _make_parents(directory: Path) -> list[Path]:
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _stage(path: Path, text: str) -> Path:
    """A temporary beside `path` with its text, and the mode `path` has (or the umask gives a new file)."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "wb") as stream:
        stream.write(text.encode("utf-8"))
    os.chmod(name, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _roll_back(done: list[tuple[Path | None, FileChange]], leftovers: list[Path], created_dirs: list[Path]) -> None:
    for backup, change in reversed(done):
        if backup is not None:
            os.replace(backup, change.path)
        elif change.old_text is None:
            change.path.unlink(missing_ok=True)
        else:
            change.path.write_bytes(change.old_text.encode("utf-8"))
    for temporary in leftovers:
        temporary.unlink(missing_ok=True)
    for directory in created_dirs:
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
