"""Import blocks for generated code, laid out as ruff's isort does with PEFT's settings.

Which names a generated file imports depends on the target (its module may sort anywhere), so the block is built
here rather than in a template.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


def format_imports(statements: Iterable[tuple[str, tuple[str, ...]]], first_party: tuple[str, ...] = ("peft",)) -> str:
    """(module, names) pairs to an import block; no names means `import module`, `module as alias` is kept.

    `first_party` are the top-level modules ruff counts as the project's own: peft (PEFT's settings), and modules
    generated next to the importing file (ruff finds those in the project root).
    """
    straight: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}
    for module, names in statements:
        if names:
            members.setdefault(module, set()).update(names)
        else:
            straight.setdefault(module, set())
    sections: dict[int, list[str]] = {}
    for module in sorted(straight, key=_module_key):
        sections.setdefault(_section(module, first_party), []).append(f"import {module}")
    for module in sorted(members, key=_module_key):
        names = ", ".join(sorted(members[module], key=_member_key))
        sections.setdefault(_section(module, first_party), []).append(f"from {module} import {names}")
    return "\n\n".join("\n".join(lines) for _, lines in sorted(sections.items()))


def _section(module: str, first_party: tuple[str, ...]) -> int:
    if module.startswith("."):
        return 4
    top = module.split(".")[0].split(" ")[0]
    if top == "__future__":
        return 0
    if top in sys.stdlib_module_names:
        return 1
    return 3 if top in first_party else 2


def _module_key(module: str) -> tuple[str, str]:
    return module.lower(), module


def _member_key(name: str) -> tuple[int, str]:
    if name.isupper() and len(name) > 1:
        kind = 0
    elif name[:1].isupper():
        kind = 1
    else:
        kind = 2
    return kind, name.lower()
