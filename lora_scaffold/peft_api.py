"""Which PEFT layer API the installed peft speaks."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lora_scaffold.errors import ScaffoldError


CONFIG_API_SINCE = (0, 19)


def installed_peft_version() -> tuple[int, ...] | None:
    try:
        return _parse(version("peft"))
    except PackageNotFoundError:
        return None


def require_supported_peft() -> None:
    found = installed_peft_version()
    if found is None:
        raise ScaffoldError("peft is not installed; install peft>=0.19")
    if found < CONFIG_API_SINCE:
        shown = ".".join(map(str, found))
        raise ScaffoldError(f"peft {shown} is installed; lora-scaffold generates layers for peft>=0.19 only so far")


def _parse(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
