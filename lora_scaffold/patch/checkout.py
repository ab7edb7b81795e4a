"""Find and read a peft source checkout (its text only: the checkout is never imported)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold.errors import PatchError
from lora_scaffold.patch.battery import BATTERY_FILE
from lora_scaffold.patch.dispatch import LAYER_FILE, call_form
from lora_scaffold.patch.exports import INIT_FILE
from lora_scaffold.patch.quantization import QUANTIZATION_FILE
from lora_scaffold.patch.supported import MODEL_FILE
from lora_scaffold.peft_release import PATCH, PeftRelease, release_for
from lora_scaffold.record import GenerationRecord, record_path


VERSION_FILE = "src/peft/__init__.py"
LORA_PACKAGE = "src/peft/tuners/lora"
# The files PEFT owns that patch mode edits (and never replaces or deletes).
EDITED_FILES = (LAYER_FILE, INIT_FILE, BATTERY_FILE, MODEL_FILE, QUANTIZATION_FILE)


@dataclass(frozen=True)
class PeftCheckout:
    root: Path
    peft: PeftRelease
    call_form: str
    sources: tuple[tuple[str, str], ...]

    def source(self, relative: str) -> str:
        return dict(self.sources)[relative]

    def edited_sources(self) -> dict[str, str]:
        return {path: text for path, text in self.sources if path in EDITED_FILES}

    def path(self, relative: str) -> Path:
        return safe_path(self.root, relative)

    def record(self, module_name: str) -> GenerationRecord | None:
        path = self.path(record_path(module_name))
        if not path.is_file():
            return None
        return GenerationRecord.from_json(read_text(path), str(path))

    def records(self) -> list[str]:
        folder = self.path(record_path("x")).parent
        return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def checkout_root(path: str | Path) -> Path:
    if not str(path).strip():
        raise PatchError("--peft-checkout needs the path of a peft source checkout, got an empty one")
    return Path(path)


def read_checkout(path: str | Path) -> PeftCheckout:
    root = checkout_root(path)
    if not root.is_dir():
        raise PatchError(f"--peft-checkout {root}: no such folder")
    sources = {}
    for relative, expected in (
        (LAYER_FILE, "PEFT's LoRA layers with dispatch_default"),
        (INIT_FILE, "the lora package's imports and __all__"),
        (VERSION_FILE, "__version__"),
        (BATTERY_FILE, "PEFT's custom-model test battery"),
    ):
        file = safe_path(root, relative)
        if not file.is_file():
            raise PatchError(f"{root} is not a peft source checkout: {relative} ({expected}) is missing")
        sources[relative] = read_text(file)
    for optional in (MODEL_FILE, QUANTIZATION_FILE):  # edited where there, for some targets: a checkout may lack it
        if safe_path(root, optional).is_file():
            sources[optional] = read_text(safe_path(root, optional))
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', sources[VERSION_FILE], re.MULTILINE)
    if match is None:
        raise PatchError(f"{root / VERSION_FILE} sets no __version__")
    peft = release_for(PATCH, match.group(1))
    return PeftCheckout(root, peft, call_form(sources[LAYER_FILE]), tuple(sources.items()))


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise PatchError(f"{path} is not UTF-8 text; lora-scaffold leaves it alone") from None


def safe_path(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute names, `..` and symlinks anywhere below the checkout."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise PatchError(f"refusing to touch {relative}: outside the checkout")
    path = root
    for part in candidate.parts:
        path = path / part
        if path.is_symlink():
            raise PatchError(f"refusing to touch {path}: it is a symbolic link")
    return path
