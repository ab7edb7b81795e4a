"""Small libcst helpers shared by the patch transforms, and the `Edit` each transform module offers."""

from __future__ import annotations

import ast
import functools
import re
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


HIDDEN = "__lora_scaffold_unparsed_{}__"
HIDDEN_LINE = re.compile(r"^[ \t]*__lora_scaffold_unparsed_(\d+)__\n", re.MULTILINE)


@dataclass(frozen=True)
class Excerpt:
    """A source with only some statements parsed by libcst, each other one a one-line placeholder.

    libcst takes over a second for PEFT's 8 000-line test battery, ast a tenth of that: ast finds the statements,
    libcst parses the ones an edit looks at, with every blank line and comment between statements as it was, so an
    edit of `module` means what it means on the whole file. `code` puts the hidden statements back."""

    module: cst.Module
    hidden: tuple[str, ...]

    def code(self, module: cst.Module) -> str:
        return HIDDEN_LINE.sub(lambda match: self.hidden[int(match.group(1))], module.code)


def excerpt(
    source: str,
    filename: str,
    wanted: Callable[[ast.stmt], bool],
    wanted_method: Callable[[ast.stmt], bool] | None = None,
) -> Excerpt:
    """The top-level statements `wanted` is true for, parsed (the whole source where the shortcut cannot be exact);
    with `wanted_method`, of the classes among them only the methods it is true for (PEFT's LoraModel is most of
    model.py, and one of its methods holds what an edit looks for)."""
    statements = top_level_statements(source, filename)
    if "\r" in source or HIDDEN.format("") in source:
        return Excerpt(parse(source, filename), ())  # CRLF, or our own placeholder
    lines = source.splitlines(keepends=True)
    pieces: list[str] = []
    hidden: list[str] = []
    end = _hide_unwanted(statements, lines, 0, wanted, wanted_method, pieces, hidden)
    if end is None:
        return Excerpt(parse(source, filename), ())
    pieces.append("".join(lines[end:]))
    return Excerpt(parse("".join(pieces), filename), tuple(hidden))


def _hide_unwanted(statements, lines, next_line, wanted, wanted_method, pieces, hidden) -> int | None:
    """Appends the source from `next_line` to the statements' end to `pieces`, each unwanted statement a placeholder
    line at its indentation; the line it ended at, or None where statements share a line (`a; b`)."""
    for statement in statements:
        first = _first_line(statement)
        if first < next_line:
            return None
        pieces.append("".join(lines[next_line:first]))  # blank lines and comments before it, parsed as they are
        if not wanted(statement):
            indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
            pieces.append(indent + HIDDEN.format(len(hidden)) + "\n")
            hidden.append("".join(lines[first : statement.end_lineno]))
        elif isinstance(statement, ast.ClassDef) and wanted_method is not None:
            body_start = _first_line(statement.body[0])
            if body_start <= first:
                return None  # `class A: ...` on one line
            pieces.append("".join(lines[first:body_start]))

            def kept(member: ast.stmt) -> bool:
                return not isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) or wanted_method(member)

            if _hide_unwanted(statement.body, lines, body_start, kept, None, pieces, hidden) is None:
                return None
        else:
            pieces.append("".join(lines[first : statement.end_lineno]))
        next_line = statement.end_lineno
    return next_line


def _first_line(statement: ast.stmt) -> int:
    """The statement's first line, its decorators' included, counted from 0."""
    return min([statement.lineno, *(d.lineno for d in getattr(statement, "decorator_list", ()))]) - 1


@functools.lru_cache(maxsize=16)
def top_level_statements(source: str, filename: str) -> tuple[ast.stmt, ...]:
    """ast's module body, once per text (one run reads layer.py several times); callers do not change the nodes."""
    try:
        return tuple(ast.parse(source).body)
    except SyntaxError as exc:
        raise PatchError(f"{filename} does not parse: {exc.msg} (line {exc.lineno})") from None


def defines(name: str) -> Callable[[ast.stmt], bool]:
    """For excerpt: the statements defining or assigning `name` at module level."""

    def wanted(statement: ast.stmt) -> bool:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return statement.name == name
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        return any(isinstance(target, ast.Name) and target.id == name for target in targets)

    return wanted


def if_statement(test: str, body: str) -> cst.If:
    """`if test:` over `body` (unindented lines), as libcst parses it."""
    indented = "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())
    return cst.parse_statement(f"if {test}:\n{indented}")


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
