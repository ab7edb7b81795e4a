"""Add or take out one branch of `resolve_quantization_backend` (src/peft/utils/quantization_utils.py, peft 0.21 on):
for a quantized base PEFT has no backend for, `if isinstance(base_layer, Target): return TargetBackend()` just
before the function's closing `return None`, so that PEFT's other tuners that resolve a backend (OFT, VeRA, SHiRA,
...) adapt the base too. Every other node is reused as it was."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from lora_scaffold.errors import PatchError
from lora_scaffold.patch.cst_utils import (
    Edit,
    code,
    defines,
    excerpt,
    if_statement,
    index_of,
    is_function,
    normalized,
    with_statement,
)


QUANTIZATION_FILE = "src/peft/utils/quantization_utils.py"
FUNCTION = "resolve_quantization_backend"


@dataclass(frozen=True)
class BackendBranch:
    """`if test: body`, returning `backend_class`, which tells this branch from any other on the same type."""

    test: str
    body: str
    backend_class: str
    comment: str

    def statement(self) -> cst.If:
        comment = cst.EmptyLine(comment=cst.Comment(f"# {self.comment}"))
        return if_statement(self.test, self.body).with_changes(leading_lines=[comment])


def backend_edit(branch: BackendBranch) -> Edit:
    return Edit(
        QUANTIZATION_FILE,
        lambda source: insert_backend(source, branch),
        lambda source, force: remove_backend(source, branch, force),
    )


def _function(source: str):
    view = excerpt(source, QUANTIZATION_FILE, defines(FUNCTION))
    index = index_of(view.module.body, lambda statement: is_function(statement, FUNCTION))
    if index is None:
        raise PatchError(f"{QUANTIZATION_FILE} has no module-level function {FUNCTION}")
    return view, index, view.module.body[index]


def _find(body, branch: BackendBranch) -> int | None:
    wanted = normalized(branch.test)
    for position, statement in enumerate(body):
        if isinstance(statement, cst.If) and normalized(code(statement.test)) == wanted:
            if f"{branch.backend_class}(" in code(statement.body):
                return position
    return None


def insert_backend(source: str, branch: BackendBranch) -> str:
    """Before the closing `return None` (with its comment), after every branch PEFT has: PEFT's own come first."""
    view, index, function = _function(source)
    body = list(function.body.body)
    if _find(body, branch) is not None:
        return source
    closing = len(body)
    if body and isinstance(body[-1], cst.SimpleStatementLine) and isinstance(body[-1].body[0], cst.Return):
        closing = len(body) - 1
    statement = branch.statement()
    statement = statement.with_changes(leading_lines=[cst.EmptyLine(indent=False), *statement.leading_lines])
    body.insert(closing, statement)
    function = function.with_changes(body=function.body.with_changes(body=body))
    return view.code(with_statement(view.module, index, function))


def remove_backend(source: str, branch: BackendBranch, force: bool) -> str:
    """Take the branch out again; refuse (unless forced) when it is not what lora-scaffold wrote."""
    view, index, function = _function(source)
    body = list(function.body.body)
    position = _find(body, branch)
    if position is None:
        return source
    if code(body[position].body) != code(branch.statement().body) and not force:
        raise PatchError(
            f"the {FUNCTION} branch for {branch.test} in {QUANTIZATION_FILE} was edited; pass --force to remove it"
        )
    body.pop(position)
    function = function.with_changes(body=function.body.with_changes(body=body))
    return view.code(with_statement(view.module, index, function))
