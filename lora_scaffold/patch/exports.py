"""Import and export the generated layer in `peft/tuners/lora/__init__.py` (and take both out again)."""

from __future__ import annotations

import libcst as cst

from lora_scaffold.errors import PatchError
from lora_scaffold.patch.cst_utils import (
    Edit,
    assigned_list,
    code,
    index_of,
    insert_element,
    parse,
    remove_elements,
    with_assigned_list,
    with_statement,
)


INIT_FILE = "src/peft/tuners/lora/__init__.py"


def export_edit(module_name: str, class_name: str) -> Edit:
    return Edit(
        INIT_FILE,
        lambda source: add_export(source, module_name, class_name),
        lambda source, force: remove_export(source, module_name, class_name),
    )


def add_export(source: str, module_name: str, class_name: str) -> str:
    module = parse(source, INIT_FILE)
    modules = [_relative_module(statement) for statement in module.body]
    if module_name not in modules and class_name in exported_names(source):
        raise PatchError(f"PEFT already exports a {class_name} from {INIT_FILE}; pick another --name")
    if module_name not in modules:
        present = [i for i, found in enumerate(modules) if found]
        if not present:
            raise PatchError(f"{INIT_FILE} has no `from .module import ...` lines")
        position = next((i for i in present if modules[i] > module_name), present[-1] + 1)
        body = list(module.body)
        body.insert(position, cst.parse_statement(f"from .{module_name} import {class_name}\n"))
        module = module.with_changes(body=body)
    index, names = _all_list(module)
    values = [element.value.evaluated_value for element in names.elements]
    if class_name in values:
        return module.code
    position = next((i for i, value in enumerate(values) if _sort_key(value) > _sort_key(class_name)), len(values))
    elements = insert_element(names.elements, position, cst.SimpleString(f'"{class_name}"'), f"__all__ in {INIT_FILE}")
    return with_statement(module, index, with_assigned_list(module.body[index], elements)).code


def exported_names(source: str) -> list[str]:
    """The names in the lora package's `__all__`."""
    return [element.value.evaluated_value for element in _all_list(parse(source, INIT_FILE))[1].elements]


def remove_export(source: str, module_name: str, class_name: str) -> str:
    module = parse(source, INIT_FILE)
    modules = [_relative_module(statement) for statement in module.body]
    if module_name in modules:
        module = with_statement(module, modules.index(module_name), None)
    index, names = _all_list(module)
    elements = remove_elements(names.elements, lambda element: element.value.evaluated_value == class_name)
    if len(elements) == len(names.elements):
        return module.code
    return with_statement(module, index, with_assigned_list(module.body[index], elements)).code


def _relative_module(statement: cst.CSTNode) -> str | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        node = statement.body[0]
        if isinstance(node, cst.ImportFrom) and len(node.relative) == 1 and node.module is not None:
            return code(node.module)
    return None


def _all_list(module: cst.Module) -> tuple[int, cst.List]:
    index = index_of(module.body, lambda statement: assigned_list(statement, "__all__") is not None)
    if index is None:
        raise PatchError(f"{INIT_FILE} has no `__all__ = [...]` list")
    return index, assigned_list(module.body[index], "__all__")


def _sort_key(name: str) -> tuple[int, str]:
    """RUF022's isort-style order: SCREAMING_CASE, then CamelCase, then the rest."""
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name
