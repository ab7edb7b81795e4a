"""Find and read a peft source checkout (its text only: the checkout is never imported)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold.patch.battery import BATTERY_FILE
from lora_scaffold.patch.cst_utils import PatchError
from lora_scaffold.patch.dispatch import LAYER_FILE, call_form
from lora_scaffold.patch.exports import INIT_FILE


VERSION_FILE = "src/peft/__init__.py"
LORA_PACKAGE = "src/peft/tuners/lora"


@dataclass(frozen=True)
class PeftCheckout:
    root: Path
    version: str
    call_form: str
    sources: tuple[tuple[str, str], ...]

    def source(self, relative: str) -> str:
        return dict(self.sources)[relative]


def read_checkout(path: str | Path) -> PeftCheckout:
    root = Path(path)
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
        sources[relative] = file.read_bytes().decode("utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', sources[VERSION_FILE], re.MULTILINE)
    if match is None:
        raise PatchError(f"{root / VERSION_FILE} sets no __version__")
    return PeftCheckout(root, match.group(1), call_form(sources[LAYER_FILE]), tuple(sources.items()))


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
