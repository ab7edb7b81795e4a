"""Small libcst helpers shared by the patch transforms, and the `Edit` each transform module offers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import libcst as cst

from lora_scaffold.errors import PatchError


@dataclass(frozen=True)
class Edit:
    """One change to one file of the checkout and its exact inverse, both source text in, source text out.

    `apply` leaves a source that already has the change as it is; `revert(source, force)` takes it out, refusing
    (unless forced) when what was added has been edited since."""

    path: str
    apply: Callable[[str], str]
    revert: Callable[[str, bool], str]


@functools.lru_cache(maxsize=16)
def parse(source: str, filename: str) -> cst.Module:
    """Parsed once per text: one run reads layer.py several times, and libcst trees are immutable."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise PatchError(f"{filename} does not parse: {exc.message} (line {exc.raw_line})") from None


def code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def normalized(text: str) -> str:
    return "".join(text.split())


def index_of(statements, predicate) -> int | None:
    return next((index for index, statement in enumerate(statements) if predicate(statement)), None)


def is_class(statement: cst.CSTNode, name: str) -> bool:
    return isinstance(statement, cst.ClassDef) and statement.name.value == name


def is_function(statement: cst.CSTNode, name: str) -> bool:
    return isinstance(statement, cst.FunctionDef) and statement.name.value == name


def assigned_list(statement: cst.CSTNode, name: str) -> cst.List | None:
    """The list of `name = [...]`, when the statement is that assignment."""
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
        assign = statement.body[0]
        target = assign.targets[0].target
        if isinstance(target, cst.Name) and target.value == name and isinstance(assign.value, cst.List):
            return assign.value
    return None


def with_assigned_list(statement: cst.SimpleStatementLine, elements: list[cst.Element]) -> cst.SimpleStatementLine:
    assign = statement.body[0]
    return statement.with_changes(body=[assign.with_changes(value=assign.value.with_changes(elements=elements))])


def with_statement(module: cst.Module, index: int, statement: cst.CSTNode | None) -> cst.Module:
    """The module with its `index`-th top-level statement replaced (or removed, for None)."""
    body = list(module.body)
    body[index : index + 1] = [] if statement is None else [statement]
    return module.with_changes(body=body)


def insert_element(elements: list[cst.Element], position: int, value: cst.BaseExpression, where: str):
    """Insert into a one-item-a-line list or tuple, keeping its commas and line breaks as they were."""
    elements = list(elements)
    if len(elements) < 2:
        raise PatchError(f"{where} has fewer than two entries, so its layout cannot be followed")
    # A comma's trailing whitespace may hold the comment lines before the next element: copy one without any.
    plain = [e.comma for e in elements[:-1] if "#" not in code(e.comma)]
    between, closing = (plain or [elements[0].comma])[0], elements[-1].comma
    if position >= len(elements):
        elements[-1] = elements[-1].with_changes(comma=between)
        elements.append(cst.Element(value, comma=closing))
    else:
        elements.insert(position, cst.Element(value, comma=between))
    return elements


def remove_elements(elements: list[cst.Element], unwanted) -> list[cst.Element]:
    """The inverse of insert_element for every element `unwanted(element)` is true for."""
    kept = [element for element in elements if not unwanted(element)]
    if kept and len(kept) < len(elements) and unwanted(elements[-1]):
        kept[-1] = kept[-1].with_changes(comma=elements[-1].comma)
    return kept
