"""`--init EXPR`: build the target from an expression, for classes that take objects (a transformers config)
rather than literals. It is the user's own code, evaluated with the target's module, torch and nn in scope, and
it goes into the generated tests as one canonical expression whose names are imported from the target's module."""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import sys

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, TargetError
from lora_scaffold.names import GENERATED_NAMES, canonical_tree, target_alias
from lora_scaffold.resolve import ResolvedTarget


IN_SCOPE = {"torch": torch, "nn": nn}


class ModuleNamespace(dict):
    """A namespace in which a top-level module's name imports it (`transformers.GPT2Config(...)`)."""

    def __missing__(self, name: str):
        if hasattr(builtins, name) or importlib.util.find_spec(name) is None:
            raise KeyError(name)
        self[name] = importlib.import_module(name)
        return self[name]


def imports_for(target: ResolvedTarget, expression: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """What the generated tests import to evaluate the expression: names from the target's module, and modules
    it names (`transformers`), in the (module, names) form of `imports.format_imports`."""
    module = sys.modules[target.import_module]
    names = sorted({node.id for node in ast.walk(ast.parse(expression, mode="eval")) if isinstance(node, ast.Name)})
    from_module, modules = [], []
    for name in names:
        # The target class generated code imports anyway, aliased where its name is one generated code uses.
        if name in IN_SCOPE or hasattr(builtins, name) or name == target.class_name:
            continue
        if name in GENERATED_NAMES:
            raise TargetError(f"--init uses {name!r}, a name generated code uses too; alias it")
        if hasattr(module, name):
            from_module.append(name)
        elif importlib.util.find_spec(name) is not None:
            modules.append((name, ()))
        else:
            raise TargetError(f"--init uses {name!r}, which {target.import_module} does not define or import")
    return ((target.import_module, tuple(from_module)),) * bool(from_module) + tuple(modules)


def build(target: ResolvedTarget, expression: str, device: str = "cpu") -> nn.Module:
    namespace = ModuleNamespace({**vars(sys.modules[target.import_module]), **IN_SCOPE})
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


def aliased(expression: str, class_name: str) -> str:
    """The expression naming the target class as generated code imports it (`Wrapper` is `WrapperTarget` there)."""
    alias = target_alias(class_name)
    if alias == class_name:
        return expression
    tree = canonical_tree(expression)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == class_name:
            node.id = alias
    return ast.unparse(tree)
