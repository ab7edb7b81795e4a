"""Wire a generated layer into PEFT's common test battery, `tests/test_custom_models.py`, and take it out again.

Three edits: a small model class before `MockTransformerWrapper`, a `model_id` branch in its `from_pretrained`,
and entries at the end of `TEST_CASES`. Each is found again by name for removal.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from lora_scaffold.patch.cst_utils import PatchError, code, insert_element, is_class, parse, remove_elements


BATTERY_FILE = "tests/test_custom_models.py"
WRAPPER = "MockTransformerWrapper"


@dataclass(frozen=True)
class BatteryEntry:
    model_id: str
    model_class: str
    class_code: str
    test_cases: tuple[str, ...]

    def branch_code(self, dtype_name: str) -> str:
        return f'if model_id == "{self.model_id}":\n    return {self.model_class}().to({dtype_name})\n'

    def case_names(self) -> set[str]:
        return {cst.parse_expression(case).elements[0].value.evaluated_value for case in self.test_cases}


def add_battery_entry(source: str, entry: BatteryEntry) -> str:
    module = parse(source, BATTERY_FILE)
    if any(is_class(statement, entry.model_class) for statement in module.body):
        return source
    module = _insert_model_class(module, entry)
    dtype_name = _from_pretrained(module).params.params[-1].name.value  # `dtype`, or `torch_dtype` before 0.18
    module = _edit_from_pretrained(module, lambda body: _insert_branch(body, entry, dtype_name))
    return _edit_test_cases(module, lambda elements: _append_cases(elements, entry)).code


def remove_battery_entry(source: str, entry: BatteryEntry, force: bool) -> str:
    module = parse(source, BATTERY_FILE)
    index = next((i for i, statement in enumerate(module.body) if is_class(statement, entry.model_class)), None)
    if index is None:
        return source
    found = code(module, module.body[index].with_changes(leading_lines=()))
    if found != entry.class_code and not force:
        raise PatchError(f"{entry.model_class} in {BATTERY_FILE} was edited; pass --force to remove it")
    body = list(module.body)
    del body[index]
    module = module.with_changes(body=body)
    module = _edit_from_pretrained(module, lambda statements: _remove_branch(statements, entry))
    return _edit_test_cases(module, lambda elements: _remove_cases(elements, entry)).code


def _insert_model_class(module: cst.Module, entry: BatteryEntry) -> cst.Module:
    index = next((i for i, statement in enumerate(module.body) if is_class(statement, WRAPPER)), None)
    if index is None:
        raise PatchError(f"{BATTERY_FILE} has no class {WRAPPER}")
    new_class = cst.parse_statement(entry.class_code).with_changes(leading_lines=module.body[index].leading_lines)
    body = list(module.body)
    body.insert(index, new_class)
    return module.with_changes(body=body)


def _from_pretrained(module: cst.Module) -> cst.FunctionDef:
    wrapper = next(statement for statement in module.body if is_class(statement, WRAPPER))
    return next(m for m in wrapper.body.body if isinstance(m, cst.FunctionDef) and m.name.value == "from_pretrained")


def _edit_from_pretrained(module: cst.Module, edit) -> cst.Module:
    index = next((i for i, statement in enumerate(module.body) if is_class(statement, WRAPPER)), None)
    if index is None:
        raise PatchError(f"{BATTERY_FILE} has no class {WRAPPER}")
    wrapper = module.body[index]
    methods = list(wrapper.body.body)
    position = next(
        (i for i, m in enumerate(methods) if isinstance(m, cst.FunctionDef) and m.name.value == "from_pretrained"),
        None,
    )
    if position is None:
        raise PatchError(f"{WRAPPER} in {BATTERY_FILE} has no from_pretrained")
    method = methods[position]
    methods[position] = method.with_changes(body=method.body.with_changes(body=edit(list(method.body.body))))
    body = list(module.body)
    body[index] = wrapper.with_changes(body=wrapper.body.with_changes(body=methods))
    return module.with_changes(body=body)


def _insert_branch(statements: list, entry: BatteryEntry, dtype_name: str) -> list:
    if not any(isinstance(s, cst.If) for s in statements) or not isinstance(statements[-1], cst.SimpleStatementLine):
        raise PatchError(f"{WRAPPER}.from_pretrained in {BATTERY_FILE} does not end in `if model_id == ...` branches")
    branch = cst.parse_statement(entry.branch_code(dtype_name)).with_changes(
        leading_lines=statements[-1].leading_lines
    )
    return statements[:-1] + [branch, statements[-1]]


def _remove_branch(statements: list, entry: BatteryEntry) -> list:
    wanted = f'model_id == "{entry.model_id}"'
    empty = cst.Module(body=[])
    return [s for s in statements if not (isinstance(s, cst.If) and empty.code_for_node(s.test) == wanted)]


def _edit_test_cases(module: cst.Module, edit) -> cst.Module:
    for index, statement in enumerate(module.body):
        if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
            assign = statement.body[0]
            target = assign.targets[0].target
            if isinstance(target, cst.Name) and target.value == "TEST_CASES" and isinstance(assign.value, cst.List):
                elements = edit(list(assign.value.elements))
                new_assign = assign.with_changes(value=assign.value.with_changes(elements=elements))
                body = list(module.body)
                body[index] = statement.with_changes(body=[new_assign])
                return module.with_changes(body=body)
    raise PatchError(f"{BATTERY_FILE} has no `TEST_CASES = [...]` list")


def _append_cases(elements: list, entry: BatteryEntry) -> list:
    if len(elements) < 2:
        raise PatchError(f"TEST_CASES in {BATTERY_FILE} is too short to follow its layout")
    for case in entry.test_cases:
        elements = insert_element(elements, len(elements), cst.parse_expression(case))
    return elements


def _remove_cases(elements: list, entry: BatteryEntry) -> list:
    names = entry.case_names()

    def ours(element) -> bool:
        value = element.value
        first = value.elements[0].value if isinstance(value, cst.Tuple) and value.elements else None
        return isinstance(first, cst.SimpleString) and first.evaluated_value in names

    return remove_elements(elements, ours)
