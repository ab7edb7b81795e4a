"""Small libcst helpers shared by the patch transforms."""

from __future__ import annotations

import functools

import libcst as cst

from lora_scaffold.errors import ScaffoldError


class PatchError(ScaffoldError):
    """The checkout does not look as expected, or the user edited what lora-scaffold added."""


@functools.lru_cache(maxsize=16)
def parse(source: str, filename: str) -> cst.Module:
    """Parsed once per text: one run reads layer.py several times, and libcst trees are immutable."""
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise PatchError(f"{filename} does not parse: {exc.message} (line {exc.raw_line})") from None


def code(module: cst.Module, node: cst.CSTNode) -> str:
    return module.code_for_node(node)


def normalized(text: str) -> str:
    return "".join(text.split())


def top_level_index(module: cst.Module, predicate) -> int | None:
    return next((index for index, statement in enumerate(module.body) if predicate(statement)), None)


def is_class(statement: cst.CSTNode, name: str) -> bool:
    return isinstance(statement, cst.ClassDef) and statement.name.value == name


def is_function(statement: cst.CSTNode, name: str) -> bool:
    return isinstance(statement, cst.FunctionDef) and statement.name.value == name


def replace_body(module: cst.Module, index: int, statements: list[cst.CSTNode]) -> cst.Module:
    body = list(module.body)
    body[index : index + 1] = statements
    return module.with_changes(body=body)


def insert_element(elements: list[cst.Element], position: int, value: cst.BaseExpression) -> list[cst.Element]:
    """Insert into a one-item-a-line list or tuple, keeping its commas and line breaks as they were."""
    elements = list(elements)
    if len(elements) < 2:
        raise ValueError("needs a list of at least two elements to copy its layout")
    empty = cst.Module(body=[])
    # A comma's trailing whitespace may hold the comment lines before the next element: copy one without any.
    plain = [e.comma for e in elements[:-1] if "#" not in empty.code_for_node(e.comma)]
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
