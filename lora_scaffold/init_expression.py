"""`--init EXPR`: build the target from an expression, for classes that take objects (a transformers config)
rather than literals. It is the user's own code, evaluated with the target's module, torch and nn in scope, and
it goes into the generated tests as one canonical expression whose names are imported from the target's module."""

from __future__ import annotations

import ast
import builtins
import sys

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, TargetError
from lora_scaffold.names import GENERATED_NAMES
from lora_scaffold.resolve import ResolvedTarget


IN_SCOPE = {"torch": torch, "nn": nn}


def normalised(expression: str) -> str:
    try:
        return ast.unparse(ast.parse(expression.strip(), mode="eval"))
    except SyntaxError as exc:
        raise TargetError(f"--init {expression!r} is not one Python expression ({exc.msg})") from None


def imported_names(target: ResolvedTarget, expression: str) -> tuple[str, ...]:
    """The names the expression takes from the target's module (the generated tests import them from there)."""
    module = sys.modules[target.import_module]
    names = sorted({node.id for node in ast.walk(ast.parse(expression, mode="eval")) if isinstance(node, ast.Name)})
    from_module = []
    for name in names:
        if name in IN_SCOPE or hasattr(builtins, name):
            continue
        if not hasattr(module, name):
            raise TargetError(f"--init uses {name!r}, which {target.import_module} does not define or import")
        if name in GENERATED_NAMES and name != target.class_name:
            raise TargetError(
                f"--init uses {name!r}, a name generated code uses too; alias it in {target.import_module}"
            )
        from_module.append(name)
    return tuple(from_module)


def build(target: ResolvedTarget, expression: str, device: str = "cpu") -> nn.Module:
    namespace = {**vars(sys.modules[target.import_module]), **IN_SCOPE}
    torch.manual_seed(0)
    try:
        with torch.device(device):
            module = eval(expression, namespace)  # noqa: S307 - the user's own expression, like the target's import
    except USER_CODE_ERRORS as exc:
        if device != "cpu":
            return build(target, expression, "cpu")
        raise TargetError(f"--init {expression} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, target.cls):
        raise TargetError(f"--init {expression} gives a {type(module).__name__}, not a {target.class_name}")
    return module
