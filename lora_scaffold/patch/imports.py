"""Add `import NAME` to a module's block of plain imports in sorted position, or take it out when unused."""

from __future__ import annotations

import ast

import libcst as cst

from lora_scaffold.errors import PatchError
from lora_scaffold.patch.cst_utils import Edit, code, excerpt, parse


def import_edit(name: str, path: str) -> Edit:
    return Edit(
        path,
        lambda source: add_import(source, name, path),
        lambda source, force: remove_import_if_unused(source, name, path),
    )


def _plain_import(statement: cst.CSTNode) -> str | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        node = statement.body[0]
        if isinstance(node, cst.Import) and len(node.names) == 1 and node.names[0].asname is None:
            return code(node.names[0].name)
    return None


def add_import(source: str, name: str, filename: str) -> str:
    """`import sys` lands among the first run of plain `import x` lines, in order (ruff's isort sees no change)."""
    view = excerpt(source, filename, lambda statement: isinstance(statement, ast.Import))
    module = view.module
    names = [_plain_import(statement) for statement in module.body]
    if name in names:
        return source
    first = next((i for i, found in enumerate(names) if found), None)
    if first is None:
        raise PatchError(f"{filename} has no plain `import x` lines to add `import {name}` to")
    end = first
    while end < len(names) and names[end]:
        end += 1
    position = next((i for i in range(first, end) if names[i].lower() > name.lower()), end)
    statement = cst.parse_statement(f"import {name}\n")
    body = list(module.body)
    if position == first:
        statement = statement.with_changes(leading_lines=body[first].leading_lines)
        body[first] = body[first].with_changes(leading_lines=())
    body.insert(position, statement)
    return view.code(module.with_changes(body=body))


def remove_import_if_unused(source: str, name: str, filename: str) -> str:
    module = parse(source, filename)
    names = [_plain_import(statement) for statement in module.body]
    if name not in names:
        return source
    position = names.index(name)
    rest = list(module.body)
    removed = rest.pop(position)
    if _uses_name(module.with_changes(body=rest), name):
        return source
    if position < len(rest) and removed.leading_lines:
        rest[position] = rest[position].with_changes(leading_lines=removed.leading_lines)
    return module.with_changes(body=rest).code


def _uses_name(module: cst.Module, name: str) -> bool:
    class Finder(cst.CSTVisitor):
        found = False

        def visit_Name(self, node: cst.Name) -> None:
            if node.value == name:
                self.found = True

    finder = Finder()
    module.visit(finder)
    return finder.found
