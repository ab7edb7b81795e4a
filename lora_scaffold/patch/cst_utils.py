"""Small libcst helpers shared by the patch transforms."""

from __future__ import annotations

import libcst as cst

from lora_scaffold.errors import ScaffoldError


class PatchError(ScaffoldError):
    """The checkout does not look as expected, or the user edited what lora-scaffold added."""


def parse(source: str, filename: str) -> cst.Module:
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
