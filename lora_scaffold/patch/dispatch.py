"""Add or take out one `elif isinstance(target_base_layer, Target)` branch of `dispatch_default` (layer.py).

An `elif` is an `If` node in the previous branch's `orelse`: the chain is flattened to a list, edited, and folded
back, so every other node (and so every other byte) is reused as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from lora_scaffold.errors import PatchError
from lora_scaffold.patch.cst_utils import (
    Edit,
    Excerpt,
    code,
    defines,
    excerpt,
    if_statement,
    index_of,
    is_function,
    normalized,
    with_statement,
)


LAYER_FILE = "src/peft/tuners/lora/layer.py"


@dataclass(frozen=True)
class DispatchBranch:
    """`elif test: body`, building `layer_class`, which tells this branch from PEFT's own for the same type."""

    test: str
    body: str
    layer_class: str
    shadowed_by: frozenset[str] = frozenset()

    def statement(self) -> cst.If:
        return if_statement(self.test, self.body)


def dispatch_edit(branch: DispatchBranch) -> Edit:
    return Edit(
        LAYER_FILE,
        lambda source: insert_branch(source, branch),
        lambda source, force: remove_branch(source, branch, force),
    )


@dataclass(frozen=True)
class DispatchChain:
    """The if/elif chain on `target_base_layer` in dispatch_default, flattened."""

    source: Excerpt
    function_index: int
    statement_index: int
    branches: tuple[cst.If, ...]
    tail: cst.Else | None

    def branch_types(self) -> list[str | None]:
        """What each branch tests `isinstance` against, as spelled in the source."""
        types = []
        for branch in self.branches:
            test = branch.test
            is_isinstance = isinstance(test, cst.Call) and code(test.func) == "isinstance" and len(test.args) == 2
            types.append(code(test.args[1].value) if is_isinstance else None)
        return types

    def find(self, branch: DispatchBranch) -> int | None:
        """Our branch: the same test, and a body that builds our layer (PEFT may test the same type itself)."""
        wanted = normalized(branch.test)
        for index, node in enumerate(self.branches):
            if normalized(code(node.test)) == wanted and f"{branch.layer_class}(" in code(node.body):
                return index
        return None

    def with_branches(self, branches: list[cst.If]) -> str:
        folded: cst.BaseSuite | cst.If | cst.Else | None = self.tail
        for branch in reversed(branches):
            folded = branch.with_changes(orelse=folded)
        function = self.function
        body = list(function.body.body)
        body[self.statement_index] = folded
        function = function.with_changes(body=function.body.with_changes(body=body))
        return self.source.code(with_statement(self.source.module, self.function_index, function))

    @property
    def function(self) -> cst.FunctionDef:
        return self.source.module.body[self.function_index]


def read_chain(source: str) -> DispatchChain:
    view = excerpt(source, LAYER_FILE, defines("dispatch_default"))
    module = view.module
    function_index = index_of(module.body, lambda statement: is_function(statement, "dispatch_default"))
    if function_index is None:
        raise PatchError(f"{LAYER_FILE} has no module-level function dispatch_default")
    function = module.body[function_index]
    for statement_index in reversed(range(len(function.body.body))):
        statement = function.body.body[statement_index]
        if not isinstance(statement, cst.If):
            continue
        branches, tail = _flatten(statement)
        if any("target_base_layer" in code(branch.test) for branch in branches):
            return DispatchChain(view, function_index, statement_index, tuple(branches), tail)
    raise PatchError(f"dispatch_default in {LAYER_FILE} has no if/elif chain on target_base_layer")


def call_form(source: str) -> str:
    """How dispatch_default builds layers: `config=config` (peft >= 0.19) or plain `**kwargs` (older)."""
    function = read_chain(source).function
    third = function.params.params[2].name.value if len(function.params.params) > 2 else ""
    return "config" if third == "config" else "kwargs"


def insert_branch(source: str, branch: DispatchBranch) -> str:
    """Insert the branch after the parameter_name branch, before the first branch for a base class of the target
    (else at the end of the chain). A chain that already has the branch is returned unchanged."""
    chain = read_chain(source)
    if chain.find(branch) is not None:
        return source
    branches = list(chain.branches)
    start = 1 if branches and "parameter_name" in code(branches[0].test) else 0
    types = chain.branch_types()
    position = next((i for i in range(start, len(branches)) if types[i] in branch.shadowed_by), len(branches))
    new = branch.statement()
    if position == 0 and branches:
        new = new.with_changes(leading_lines=branches[0].leading_lines)
        branches[0] = branches[0].with_changes(leading_lines=())
    branches.insert(position, new)
    return chain.with_branches(branches)


def remove_branch(source: str, branch: DispatchBranch, force: bool) -> str:
    """Take the branch out again; refuse (unless forced) when its body is not what lora-scaffold wrote."""
    chain = read_chain(source)
    position = chain.find(branch)
    if position is None:
        return source
    branches = list(chain.branches)
    if code(branches[position].body) != code(branch.statement().body) and not force:
        raise PatchError(
            f"the dispatch_default branch for {branch.test} in {LAYER_FILE} was edited; pass --force to remove it"
        )
    removed = branches.pop(position)
    if position == 0 and branches:
        branches[0] = branches[0].with_changes(leading_lines=removed.leading_lines)
    return chain.with_branches(branches)


def _flatten(statement: cst.If) -> tuple[list[cst.If], cst.Else | None]:
    branches = []
    node: cst.If | cst.Else | None = statement
    while isinstance(node, cst.If):
        branches.append(node)
        node = node.orelse
    return branches, node
