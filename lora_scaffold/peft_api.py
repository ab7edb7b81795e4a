"""Which of PEFT's two layer APIs to generate for: `config` (peft >= 0.19) or `kwargs` (peft 0.13 - 0.18)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lora_scaffold.errors import ScaffoldError


CONFIG_API, KWARGS_API = "config", "kwargs"
CONFIG_API_SINCE = (0, 19)
OLDEST_SUPPORTED = (0, 13)
LORA_VARIANTS_SINCE = (0, 16)  # LoraVariant, through which DoRA plugs into a layer


def installed_peft_version() -> tuple[int, ...] | None:
    try:
        return parse_version(version("peft"))
    except PackageNotFoundError:
        return None


def layer_api(found: tuple[int, ...] | None) -> str:
    """The API a peft of this version speaks; a clear error for a missing or too old peft."""
    if found is None:
        raise ScaffoldError("peft is not installed; install peft>=0.13")
    if found < OLDEST_SUPPORTED:
        shown = ".".join(map(str, found))
        raise ScaffoldError(f"peft {shown} is too old: lora-scaffold generates layers for peft>=0.13")
    return CONFIG_API if found >= CONFIG_API_SINCE else KWARGS_API


def has_lora_variants(found: tuple[int, ...] | None) -> bool:
    return found is not None and found >= LORA_VARIANTS_SINCE


def installed_layer_api() -> str:
    return layer_api(installed_peft_version())


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
