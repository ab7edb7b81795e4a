"""Wire a generated layer into PEFT's common test battery, `tests/test_custom_models.py`, and take it out again.

Three edits: a small model class before `MockTransformerWrapper`, a `model_id` branch in its `from_pretrained`,
and entries at the end of `TEST_CASES`. Each is found again by name for removal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import libcst as cst

from lora_scaffold.errors import PatchError
from lora_scaffold.patch.cst_utils import (
    Edit,
    Excerpt,
    assigned_list,
    code,
    defines,
    excerpt,
    index_of,
    insert_element,
    is_class,
    is_function,
    remove_elements,
    with_assigned_list,
    with_statement,
)


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

    def as_dict(self) -> dict:
        return {**asdict(self), "test_cases": list(self.test_cases)}


def battery_edit(entry: BatteryEntry) -> Edit:
    return Edit(
        BATTERY_FILE,
        lambda source: add_battery_entry(source, entry),
        lambda source, force: remove_battery_entry(source, entry, force),
    )


def add_battery_entry(source: str, entry: BatteryEntry) -> str:
    view = _excerpt(source, entry)
    module = view.module
    if any(is_class(statement, entry.model_class) for statement in module.body):
        return source
    wrapper_index = _wrapper_index(module)
    new_class = cst.parse_statement(entry.class_code)
    body = list(module.body)
    body.insert(wrapper_index, new_class.with_changes(leading_lines=body[wrapper_index].leading_lines))
    module = module.with_changes(body=body)
    dtype_name = _from_pretrained(module)[1].params.params[-1].name.value  # `dtype`, or `torch_dtype` before 0.18
    module = _edit_from_pretrained(module, lambda statements: _insert_branch(statements, entry, dtype_name))
    return view.code(_edit_test_cases(module, lambda elements: _append_cases(elements, entry)))


def remove_battery_entry(source: str, entry: BatteryEntry, force: bool) -> str:
    view = _excerpt(source, entry)
    module = view.module
    index = index_of(module.body, lambda statement: is_class(statement, entry.model_class))
    if index is None:
        return source
    if code(module.body[index].with_changes(leading_lines=())) != entry.class_code and not force:
        raise PatchError(f"{entry.model_class} in {BATTERY_FILE} was edited; pass --force to remove it")
    module = with_statement(module, index, None)
    module = _edit_from_pretrained(module, lambda statements: _remove_branch(statements, entry))
    return view.code(_edit_test_cases(module, lambda elements: _remove_cases(elements, entry)))


def _excerpt(source: str, entry: BatteryEntry) -> Excerpt:
    """The three statements the edits touch; the rest of the 8 000 lines stay text."""
    wanted = [defines(entry.model_class), defines(WRAPPER), defines("TEST_CASES")]
    return excerpt(source, BATTERY_FILE, lambda statement: any(test(statement) for test in wanted))


def _wrapper_index(module: cst.Module) -> int:
    index = index_of(module.body, lambda statement: is_class(statement, WRAPPER))
    if index is None:
        raise PatchError(f"{BATTERY_FILE} has no class {WRAPPER}")
    return index


def _from_pretrained(module: cst.Module) -> tuple[int, cst.FunctionDef]:
    methods = module.body[_wrapper_index(module)].body.body
    position = index_of(methods, lambda method: is_function(method, "from_pretrained"))
    if position is None:
        raise PatchError(f"{WRAPPER} in {BATTERY_FILE} has no from_pretrained")
    return position, methods[position]


def _edit_from_pretrained(module: cst.Module, edit) -> cst.Module:
    index = _wrapper_index(module)
    wrapper = module.body[index]
    position, method = _from_pretrained(module)
    methods = list(wrapper.body.body)
    methods[position] = method.with_changes(body=method.body.with_changes(body=edit(list(method.body.body))))
    return with_statement(module, index, wrapper.with_changes(body=wrapper.body.with_changes(body=methods)))


def _insert_branch(statements: list, entry: BatteryEntry, dtype_name: str) -> list:
    if not any(isinstance(s, cst.If) for s in statements) or not isinstance(statements[-1], cst.SimpleStatementLine):
        raise PatchError(f"{WRAPPER}.from_pretrained in {BATTERY_FILE} does not end in `if model_id == ...` branches")
    branch = cst.parse_statement(entry.branch_code(dtype_name))
    return statements[:-1] + [branch.with_changes(leading_lines=statements[-1].leading_lines), statements[-1]]


def _remove_branch(statements: list, entry: BatteryEntry) -> list:
    wanted = f'model_id == "{entry.model_id}"'
    return [s for s in statements if not (isinstance(s, cst.If) and code(s.test) == wanted)]


def _edit_test_cases(module: cst.Module, edit) -> cst.Module:
    index = index_of(module.body, lambda statement: assigned_list(statement, "TEST_CASES") is not None)
    if index is None:
        raise PatchError(f"{BATTERY_FILE} has no `TEST_CASES = [...]` list")
    elements = edit(list(assigned_list(module.body[index], "TEST_CASES").elements))
    return with_statement(module, index, with_assigned_list(module.body[index], elements))


def _append_cases(elements: list, entry: BatteryEntry) -> list:
    for case in entry.test_cases:
        elements = insert_element(elements, len(elements), cst.parse_expression(case), f"TEST_CASES in {BATTERY_FILE}")
    return elements


def _remove_cases(elements: list, entry: BatteryEntry) -> list:
    names = entry.case_names()

    def ours(element) -> bool:
        value = element.value
        first = value.elements[0].value if isinstance(value, cst.Tuple) and value.elements else None
        return isinstance(first, cst.SimpleString) and first.evaluated_value in names

    return remove_elements(elements, ours)
