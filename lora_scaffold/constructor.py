"""The target's constructor: its parameters, the arguments lora-scaffold builds it with (yours, its defaults,
guesses for common sizes), and smaller sizes where the defaults would build a huge module."""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass

from lora_scaffold.errors import TargetError
from lora_scaffold.names import is_name
from lora_scaffold.resolve import ResolvedTarget


# Small, distinct sizes for the constructor arguments layers most often require: distinct so that input and output
# dimensions cannot be confused when inferring inputs, small so that generated tests stay fast.
GUESSES: dict[str, object] = {
    "in_features": 8,
    "out_features": 12,
    "in_channels": 4,
    "out_channels": 6,
    "kernel_size": 3,
    "num_embeddings": 20,
    "embedding_dim": 8,
    "in1_features": 5,
    "in2_features": 7,
    "input_size": 6,
    "hidden_size": 8,
    "embed_dim": 8,
    "num_heads": 2,
    "nx": 8,
    "nf": 12,
    "dim": 8,
    "d_model": 8,
    "hidden_dim": 8,
    "channels": 4,
}


@dataclass(frozen=True)
class CtorParam:
    name: str
    required: bool
    default: str | None


def parse_arg_overrides(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` strings, values as Python literals, to {name: canonical literal source}."""
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not is_name(name):
            raise TargetError(f"bad --arg {pair!r}: expected NAME=VALUE, NAME a Python identifier")
        try:
            source = repr(ast.literal_eval(value.strip()))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise TargetError(
                f"bad --arg value for {name}: {value!r} is not a Python literal (strings need quotes: {name}='\"text\"')"
            ) from None
        if not _round_trips(source):
            raise TargetError(
                f"bad --arg value for {name}: {value!r} has no literal form generated code could write (as inf or nan)"
            )
        overrides[name] = source
    return overrides


def ctor_params(cls: type) -> tuple[CtorParam, ...]:
    try:
        signature = _unwrapped_signature(cls) or inspect.signature(cls)
    except (TypeError, ValueError):
        return ()
    return tuple(
        CtorParam(p.name, p.default is p.empty, None if p.default is p.empty else repr(p.default))
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def _unwrapped_signature(cls: type) -> inspect.Signature | None:
    """The signature of an `__init__` a decorator hides behind `(*args, **kwargs)` (transformers wraps MambaMixer's):
    the function it wraps, through `__wrapped__` or the decorator's closure. None when nothing hides it."""
    init = cls.__dict__.get("__init__")
    if init is None or not _takes_anything(inspect.signature(init)):
        return None
    wrapped = getattr(init, "__wrapped__", None)
    cells = [cell.cell_contents for cell in getattr(init, "__closure__", None) or () if _filled(cell)]
    original = wrapped or next((f for f in cells if inspect.isfunction(f) and f.__name__ == "__init__"), None)
    if original is None:
        return None
    parameters = list(inspect.signature(original).parameters.values())[1:]  # without self
    return inspect.Signature(parameters)


def _takes_anything(signature: inspect.Signature) -> bool:
    kinds = [p.kind for p in signature.parameters.values()]
    return inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds and len(kinds) <= 3


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _accepts_any_keyword(cls: type) -> bool:
    try:
        signature = _unwrapped_signature(cls) or inspect.signature(cls)
        return any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    except (TypeError, ValueError):
        return True


def choose_ctor_args(
    target: ResolvedTarget, params: tuple[CtorParam, ...], overrides: dict[str, str]
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    known = {p.name for p in params}
    unknown = [name for name in overrides if name not in known]
    if unknown and not _accepts_any_keyword(target.cls):
        raise TargetError(f"{target.class_name} takes no argument named {', '.join(unknown)}")
    chosen = dict(overrides)
    guessed = []
    for param in params:
        if param.required and param.name not in chosen and param.name in GUESSES:
            chosen[param.name] = repr(GUESSES[param.name])
            guessed.append(param.name)
    missing = [p.name for p in params if p.required and p.name not in chosen]
    if missing:
        example = " ".join(f"--arg {name}=VALUE" for name in missing)
        raise TargetError(f"{target.class_name} needs constructor arguments {', '.join(missing)}: pass {example}")
    order = [p.name for p in params] + unknown
    return tuple((name, chosen[name]) for name in order if name in chosen), tuple(guessed)


def _round_trips(source: str) -> bool:
    """Whether generated code can spell the value: its repr reads back as itself."""
    try:
        return repr(ast.literal_eval(source)) == source
    except (ValueError, SyntaxError):
        return False


def is_literal(value: object) -> bool:
    """Whether generated code can write the value as a literal that reads back as itself."""
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        return False
