"""Stage 1: turn the user's TARGET string into the class it names (this imports, and so runs, user code)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, TargetError
from lora_scaffold.names import is_name


# Modules generated code imports: a file target of the same name would shadow them in the generated tests.
IMPORTED_BY_GENERATED_CODE = frozenset({"torch", "peft", "pytest", "transformers", "lora_scaffold"})


@dataclass(frozen=True)
class ResolvedTarget:
    """Where the target class lives, spelled the way generated code imports it."""

    spec: str
    import_module: str
    class_name: str
    cls: type
    from_file: Path | None = None

    @property
    def qualified_name(self) -> str:
        return f"{self.import_module}.{self.class_name}"


def resolve_target(spec: str) -> ResolvedTarget:
    """Import `pkg.module.Class` or `path/to/file.py:Class` and check that it is an nn.Module subclass."""
    if ":" in spec:
        target = _resolve_file_target(spec)
    else:
        target = _resolve_dotted_target(spec)
    if not isinstance(target.cls, type) or not issubclass(target.cls, nn.Module):
        raise TargetError(f"{spec} is not an nn.Module subclass (got {target.cls!r})")
    return target


def resolve_class(spec: str, what: str = "target") -> ResolvedTarget:
    """Any class: `pkg.module.Class`, `pkg.module:Class` or `path/to/file.py:Class`."""
    location, colon, class_name = spec.rpartition(":")
    if colon and not location.endswith(".py"):
        if not is_name(class_name):
            raise TargetError(f"{what} {spec!r} should look like 'package.module:Class' or 'path/to/file.py:Class'")
        spec = f"{location}.{class_name}"
    resolved = _resolve_file_target(spec) if ":" in spec else _resolve_dotted_target(spec)
    if not isinstance(resolved.cls, type):
        raise TargetError(f"{spec} is not a class (got {resolved.cls!r})")
    return resolved


def _resolve_dotted_target(spec: str) -> ResolvedTarget:
    module_name, _, class_name = spec.rpartition(".")
    if not module_name or not all(is_name(part) for part in spec.split(".")):
        raise TargetError(f"target {spec!r} should look like 'package.module.Class' or 'path/to/file.py:Class'")
    # Console scripts do not put the working directory on sys.path; users expect their local package to import.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import_module(module_name)
    return ResolvedTarget(spec, module_name, class_name, _get_class(module, class_name, module_name))


def _resolve_file_target(spec: str) -> ResolvedTarget:
    path, module, class_name = _import_file_attribute(spec, "Class")
    return ResolvedTarget(spec, path.stem, class_name, _get_class(module, class_name, str(path)), path.resolve())


def resolve_callable(spec: str):
    """`path/to/file.py:function`: the function (scan builds a model with it)."""
    path, module, name = _import_file_attribute(spec, "function")
    return _get_class(module, name, str(path))


def _import_file_attribute(spec: str, kind: str):
    """Import `path/to/file.py` of `path/to/file.py:NAME` under its stem: (path, module, NAME)."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if path.suffix != ".py" or not is_name(name):
        raise TargetError(f"{spec!r} should look like 'path/to/file.py:{kind}'")
    if not path.is_file():
        raise TargetError(f"no such file: {path}")
    module_name = path.stem
    if not is_name(module_name):
        raise TargetError(f"{path.name!r} cannot be imported by generated code: its name is not a Python identifier")
    if module_name in sys.stdlib_module_names or module_name in IMPORTED_BY_GENERATED_CODE:
        raise TargetError(
            f"{path.name!r} would shadow the module {module_name!r}, which generated code imports; rename the file"
        )
    # As for a script: modules beside the file, and in the working folder, import.
    for folder in (str(path.resolve().parent), os.getcwd()):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    return path, import_source(module_name, path), name


def import_source(module_name: str, path: Path, package: bool = False):
    """The file at `path` imported as `module_name` (a package's __init__.py with `package`), unless it is already:
    executing it again would make new classes, which the model's modules and the generated layers' dispatch would
    not share. A package of that name from another folder goes, with its submodules: its layers are not these."""
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "").resolve() == path.resolve():
        return loaded
    if package:
        for stale in [key for key in sys.modules if key == module_name or key.startswith(f"{module_name}.")]:
            del sys.modules[stale]
    folders = [str(path.resolve().parent)] if package else None
    loader_spec = importlib.util.spec_from_file_location(module_name, path, submodule_search_locations=folders)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except USER_CODE_ERRORS as exc:
        del sys.modules[module_name]
        raise TargetError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise TargetError(f"no module named {exc.name!r} (while importing {module_name!r})") from exc
        raise TargetError(f"importing {module_name} failed: {exc}") from exc
    except USER_CODE_ERRORS as exc:
        raise TargetError(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from exc


def _get_class(module, class_name: str, where: str) -> type:
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise TargetError(f"{where} has no attribute {class_name!r}") from None
