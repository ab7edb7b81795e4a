"""Apply a set of file changes so that a crash at any moment (SIGKILL included) leaves it whole or undone.

1. `prepare`: the journal (`.lora-scaffold/journal.json` under the change's root) lists every temporary, folder
   and destination, and is fsynced before anything else is written.
2. Every new text goes to a temporary beside its destination (fsynced, with the mode the destination will have).
3. `commit`: the journal is rewritten (atomically) to say that all temporaries are complete.
4. Renames and deletions; then the journal goes.

The next run on that root first calls `recover`: a `prepare` journal is rolled back (temporaries and new folders
removed), a `commit` journal rolled forward (the remaining renames and deletions done). An error raised in the
middle (a full disk, a permission) is rolled back at once from the old texts held in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from lora_scaffold.errors import WriteError


JOURNAL = ".lora-scaffold/journal.json"
PREPARE, COMMIT = "prepare", "commit"


def checkpoint(step: str) -> None:
    """Called between every two steps that touch the disk; the crash tests replace it with a SIGKILL."""


def temporary_for(path: Path) -> Path:
    return path.parent / f".{path.name}.lora-scaffold-tmp"


def apply(root: Path, writes: list[tuple[Path, str, str | None, int | None]], deletes: list[tuple[Path, str]]) -> None:
    """`writes`: (destination, new text, old text or None, mode to keep or None); `deletes`: (path, its text)."""
    journal = root / JOURNAL
    created = _missing_folders([journal.parent, *(path.parent for path, *_ in writes)])
    entries = {
        "root": str(root),
        "folders": [str(folder) for folder in created],
        "writes": [[str(path), str(temporary_for(path))] for path, *_ in writes],
        "deletes": [str(path) for path, _ in deletes],
    }
    try:
        for folder in created:
            folder.mkdir(exist_ok=True)
        _write_journal(journal, {**entries, "state": PREPARE})
    except OSError as exc:  # a parent that is a file, a folder that cannot be written, a read-only file system
        with contextlib.suppress(OSError):
            _remove(journal.with_suffix(".tmp"))
            _remove_empty(reversed(created))
        raise WriteError(f"cannot write into {exc.filename or root} ({exc.strerror}); nothing was changed") from exc
    checkpoint("prepared")
    done: list[tuple[Path, str | None]] = []
    try:
        for path, text, _, mode in writes:
            _write_synced(temporary_for(path), text, mode)
            checkpoint(f"staged {path.name}")
        _write_journal(journal, {**entries, "state": COMMIT})
        checkpoint("committed")
        old_texts = dict(deletes)
        for path, _, old, _ in writes:
            os.replace(temporary_for(path), path)
            done.append((path, old))
            checkpoint(f"renamed {path.name}")
        for path, _ in deletes:
            path.unlink()
            done.append((path, old_texts[path]))
            checkpoint(f"deleted {path.name}")
    except OSError as exc:
        _undo(done, writes, created, journal)
        raise WriteError(
            f"writing {exc.filename or 'the output'} failed ({exc.strerror}); nothing was changed"
        ) from exc
    _finish(journal, [path for path, _ in deletes])


def pending(root: Path) -> bool:
    return (root / JOURNAL).exists() or (root / JOURNAL).with_suffix(".tmp").exists()


def recover(root: Path) -> str:
    """Complete or undo a run on `root` that was interrupted; what was done, in words ("" when nothing was)."""
    journal = root / JOURNAL
    _remove(journal.with_suffix(".tmp"))
    if not journal.is_file():
        return ""
    try:
        entries = json.loads(journal.read_text(encoding="utf-8"))
        writes = [(Path(path), Path(temporary)) for path, temporary in entries["writes"]]
        deletes, folders, state = (
            [Path(p) for p in entries["deletes"]],
            [Path(f) for f in entries["folders"]],
            entries["state"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WriteError(f"{journal} is damaged ({exc}); look at the files it names, then delete it") from None
    if state == COMMIT:
        for path, temporary in writes:
            if temporary.exists():
                os.replace(temporary, path)
        for path in deletes:
            _remove(path)
        _finish(journal, deletes)
        return f"completed an interrupted run in {root} ({len(writes)} written, {len(deletes)} deleted)"
    for _, temporary in writes:
        _remove(temporary)
    _remove(journal)
    _remove_empty(reversed(folders))
    return f"rolled back an interrupted run in {root} (it had changed nothing yet)"


def _undo(done: list[tuple[Path, str | None]], writes, created: list[Path], journal: Path) -> None:
    for path, old in reversed(done):
        if old is None:
            _remove(path)
        else:
            path.write_bytes(old.encode("utf-8"))
    for path, *_ in writes:
        _remove(temporary_for(path))
    _remove(journal)
    _remove(journal.with_suffix(".tmp"))
    _remove_empty(reversed(created))


def _finish(journal: Path, deleted: list[Path]) -> None:
    """The journal goes, and so do folders a deletion (or the journal) left empty: `remove` leaves no trace."""
    _remove(journal)
    _remove_empty([*(path.parent for path in deleted), journal.parent])


def _write_journal(journal: Path, entries: dict) -> None:
    temporary = journal.with_suffix(".tmp")
    _write_synced(temporary, json.dumps(entries, indent=1), None)
    os.replace(temporary, journal)
    _sync_folder(journal.parent)


def _write_synced(path: Path, text: str, mode: int | None) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(descriptor, text.encode("utf-8"))
        if mode is not None:
            os.fchmod(descriptor, mode)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _missing_folders(folders: list[Path]) -> list[Path]:
    """Folders to create, parents first."""
    missing = []
    for folder in folders:
        for candidate in reversed([folder, *folder.parents]):
            if not candidate.exists() and candidate not in missing:
                missing.append(candidate)
    return missing


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _remove_empty(folders) -> None:
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
