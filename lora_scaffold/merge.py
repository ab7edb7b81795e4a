"""`update`'s three-way merge of one generated file: base = what lora-scaffold wrote last time (kept in the generation
record), ours = the file as it is now, theirs = the new render. merge3 (breezy's diff3) does the merging."""

from __future__ import annotations

from dataclasses import dataclass

from merge3 import Merge3


@dataclass(frozen=True)
class Conflict:
    path: str
    yours: tuple[int, int]  # 1-based first and last line in the file on disk (last < first: an insertion point)
    base: tuple[int, int]

    def describe(self) -> str:
        first, last = self.yours
        where = f"line {first}" if last <= first else f"lines {first}-{last}"
        return f"{self.path}: {where} changed both by you and by the new render"


@dataclass(frozen=True)
class MergedFile:
    path: str
    text: str  # with conflict markers where `conflicts` is not empty
    conflicts: tuple[Conflict, ...]


YOURS, THEIRS = "yours", "lora-scaffold"


def merge_file(path: str, base: str, ours: str, theirs: str) -> MergedFile:
    """The merge of `ours` and `theirs` from `base`; conflicting hunks get standard markers."""
    if ours == base or ours == theirs:
        return MergedFile(path, theirs, ())
    if theirs == base:
        return MergedFile(path, ours, ())
    merge = Merge3(base.splitlines(True), ours.splitlines(True), theirs.splitlines(True))
    # ("conflict", base_start, base_end, ours_start, ours_end, theirs_start, theirs_end), 0-based, ends excluded
    conflicts = tuple(
        Conflict(path, (region[3] + 1, region[4]), (region[1] + 1, region[2]))
        for region in merge.merge_regions()
        if region[0] == "conflict"
    )
    text = "".join(merge.merge_lines(name_a=YOURS, name_b=THEIRS))
    return MergedFile(path, text, conflicts)
