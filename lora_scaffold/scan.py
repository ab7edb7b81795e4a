"""`scan`: which module classes of a model hold weights, which of them PEFT's LoRA handles, and the `new` command
for the others. The model is built on the meta device: no weights are allocated or downloaded."""

from __future__ import annotations

import ast
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_scaffold.constructor import ctor_params, is_literal
from lora_scaffold.errors import USER_CODE_ERRORS, TargetError
from lora_scaffold.init_expression import ModuleNamespace
from lora_scaffold.resolve import resolve_callable
from lora_scaffold.strategies import peft_builtin


@dataclass(frozen=True)
class ScannedClass:
    qualified_name: str
    instances: int
    example: str  # the name of one instance in the model
    weights: tuple[tuple[str, tuple[int, ...]], ...]
    handled_by: str  # PEFT's own layer, or "" when PEFT has none
    command: str  # the `new` command for a class PEFT does not handle ("" otherwise)
    why_not: str  # why there is no command ("" when there is one, or PEFT handles the class)


def build_model(model: str) -> nn.Module:
    """MODEL is `package.module:function`, `path/file.py:function` (called with no arguments) or an expression."""
    try:
        ast.parse(model.strip(), mode="eval")
        is_expression = ":" not in model or "(" in model
    except SyntaxError:
        is_expression = False
    try:
        with torch.device("meta"):
            built = (
                eval(model.strip(), ModuleNamespace(torch=torch, nn=nn))
                if is_expression
                else resolve_callable(model)()
            )  # noqa: S307
    except TargetError:
        raise
    except USER_CODE_ERRORS as exc:
        raise TargetError(f"building the model {model!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(built, nn.Module):
        raise TargetError(f"{model!r} gives a {type(built).__name__}, not an nn.Module")
    return built


def from_model(model: str, module_name: str) -> tuple[str, str]:
    """(target, --init expression) for the class of one submodule of MODEL, built the way the model builds it."""
    built = build_model(model)
    try:
        submodule = built.get_submodule(module_name)
    except AttributeError:
        raise TargetError(f"{model!r} has no submodule {module_name!r}; `lora-scaffold scan` lists them") from None
    cls = type(submodule)
    if "." in cls.__qualname__ or cls.__module__ == "__main__":
        raise TargetError(
            f"{cls.__qualname__} cannot be imported by generated code (defined in a function or __main__)"
        )
    path, _, function = model.rpartition(":")
    expression = f"{Path(path).stem}.{function}()" if path.endswith(".py") and "(" not in model else model
    return f"{cls.__module__}.{cls.__name__}", f"({expression}).get_submodule({module_name!r})"


def scan(model: nn.Module) -> tuple[ScannedClass, ...]:
    found: dict[type, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            found.setdefault(type(module), []).append((name or "(the model)", module))
    return tuple(_describe(cls, instances) for cls, instances in found.items())


def _describe(cls: type, instances: list[tuple[str, nn.Module]]) -> ScannedClass:
    name, module = instances[0]
    weights = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    exact, by_base = peft_builtin(cls, exact=True), peft_builtin(cls)
    # PEFT dispatches a subclass to its parent's layer, right only where the subclass computes what its parent
    # does: `new` finds out (the reuse strategy), so a subclass still gets a command.
    handled = f"lora.{exact}" if exact else f"lora.{by_base}, as its base class" if by_base else ""
    command, why_not = "", ""
    if not exact:
        if not any(sum(size > 1 for size in shape) >= 2 for _, shape in weights):
            why_not = "no weight with 2 or more dimensions: nothing for LoRA to adapt"
        else:
            command, why_not = _new_command(qualified, cls, module)
    return ScannedClass(qualified, len(instances), name, weights, handled, command, why_not)


def _new_command(qualified: str, cls: type, module: nn.Module) -> tuple[str, str]:
    """`lora-scaffold new` with the constructor arguments read from the instance's attributes of the same names."""
    words = ["lora-scaffold", "new", qualified]
    for param in ctor_params(cls):
        value = getattr(module, param.name, None)
        if isinstance(value, (bool, int, float, str, tuple)) and is_literal(value):
            if param.required or repr(value) != param.default:
                words += ["--arg", f"{param.name}={value!r}"]
        elif param.required and value is None:
            return "", f"its constructor takes {param.name!r}, which the instance does not keep: pass --arg or --init"
        elif param.required:
            return "", f"its constructor takes {param.name!r}, which is no literal: build it with --init EXPR"
    return shlex.join([*words, "-o", "lora_layers"]), ""
