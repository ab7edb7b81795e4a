"""The strategy registry: every way lora-scaffold applies LoRA, in the order `auto` tries them.

Adding a strategy: one module here (a `Strategy` subclass, see `base.py`), its partial in templates/partials/, an
entry below, and its tests. Nothing else names strategies.
"""

from __future__ import annotations

from lora_scaffold.strategies.base import Evidence, Strategy, Verdict
from lora_scaffold.strategies.beside import BESIDE
from lora_scaffold.strategies.conv import CONV
from lora_scaffold.strategies.conv_transpose import CONV_TRANSPOSE
from lora_scaffold.strategies.delta import DELTA
from lora_scaffold.strategies.embedding import EMBEDDING
from lora_scaffold.strategies.experts import EXPERTS
from lora_scaffold.strategies.linear import LINEAR
from lora_scaffold.strategies.reuse import REUSE, peft_builtin, peft_layer_unchanged
from lora_scaffold.strategies.stub import STUB


# `auto` takes the first that fits the target and that the probe confirms; delta, last, is exact for any forward.
REGISTRY: tuple[Strategy, ...] = (REUSE, LINEAR, EMBEDDING, CONV, CONV_TRANSPOSE, EXPERTS, BESIDE, DELTA, STUB)
AUTO = "auto"
FALLBACK = next(strategy for strategy in REGISTRY if strategy.fallback)  # what works where nothing factored does
CHOICES = (AUTO, *dict.fromkeys(strategy.family for strategy in REGISTRY))


def named(name: str) -> Strategy:
    return next(strategy for strategy in REGISTRY if strategy.name == name)


def asked_for(choice: str) -> tuple[Strategy, ...]:
    """The strategies one --strategy choice stands for."""
    return tuple(strategy for strategy in REGISTRY if strategy.family == choice)


def help_lines() -> str:
    """The strategies for --help, one entry each."""
    return "\n".join(f"  {strategy.name:<15} {strategy.help}" for strategy in REGISTRY)


__all__ = [
    "AUTO",
    "CHOICES",
    "REGISTRY",
    "Evidence",
    "Strategy",
    "Verdict",
    "asked_for",
    "named",
    "peft_builtin",
    "peft_layer_unchanged",
]
