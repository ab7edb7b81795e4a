"""One-change mutants of a generated layer module, made with libcst: what the generated suite must catch (issue 23).

Each operator finds its sites in the layer class and makes one mutant per site: a sign flipped, the scaling dropped or
squared, a call, a `del` or an adapter's dict entry left out (an adapter not recorded, not removed, a warning not
given), a check that raises dropped, a condition (of an `if` or a conditional expression) negated, a comparison or a
boolean flipped, a tensor's cast (`.float()`, `.to(...)`) left out. Docstrings, messages and `__repr__` are left
alone: changing them changes no behaviour."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider


@dataclass(frozen=True)
class Mutant:
    operator: str
    where: str  # "LoraBilinear.merge, line 560"
    change: str  # what the site was, and what it became
    source: str  # the whole mutated module

    @property
    def key(self) -> str:
        """How an equivalence list names it: its function and change, not its line, which moves as templates do."""
        return f"{self.where.partition(', line ')[0]}: {self.change}"


# Methods whose behaviour no contract test should see.
UNWATCHED = frozenset({"__repr__", "__init__"})
SIGNS = {
    cst.Add: cst.Subtract,
    cst.Subtract: cst.Add,
    cst.AddAssign: cst.SubtractAssign,
    cst.SubtractAssign: cst.AddAssign,
}
COMPARISONS = {
    cst.LessThan: cst.LessThanEqual,
    cst.LessThanEqual: cst.LessThan,
    cst.GreaterThan: cst.GreaterThanEqual,
    cst.GreaterThanEqual: cst.GreaterThan,
    cst.Equal: cst.NotEqual,
    cst.NotEqual: cst.Equal,
    cst.Is: cst.IsNot,
    cst.IsNot: cst.Is,
    cst.In: cst.NotIn,
    cst.NotIn: cst.In,
}


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node).strip()


def _is_scaling(node: cst.CSTNode) -> bool:
    """`self.scaling[...]`."""
    return (
        isinstance(node, cst.Subscript)
        and isinstance(node.value, cst.Attribute)
        and node.value.attr.value == "scaling"
        and isinstance(node.value.value, cst.Name)
        and node.value.value.value == "self"
    )


def _raises_only(node: cst.If) -> bool:
    """An `if` with no `else` whose body ends in a raise: a check."""
    body = node.body.body
    last = body[-1] if body else None
    raises = isinstance(last, cst.SimpleStatementLine) and any(isinstance(s, cst.Raise) for s in last.body)
    return node.orelse is None and raises


CASTS = frozenset({"float", "half", "bfloat16", "double", "to"})


def _is_cast(node: cst.Call) -> bool:
    return isinstance(node.func, cst.Attribute) and node.func.attr.value in CASTS


def _records_an_entry(statement: cst.BaseSmallStatement) -> bool:
    """`self.r[adapter_name] = r`: an adapter's entry in one of the layer's dicts."""
    return (
        isinstance(statement, cst.Assign)
        and len(statement.targets) == 1
        and isinstance(statement.targets[0].target, cst.Subscript)
    )


class _Sites(cst.CSTTransformer):
    """Walks the watched code; each candidate node of `operator` is a site, counted in order. With `target` set,
    the site of that number is replaced; the sites seen are listed in `found` (line, function, change)."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, operator: str, classes: frozenset[str], target: int = -1):
        super().__init__()
        self.operator, self.classes, self.target = operator, classes, target
        self.found: list[tuple[int, str, str]] = []
        self.scope: list[str] = []
        self.watched_depth = 0  # > 0 inside a watched class
        self.skip_depth = 0  # > 0 inside an unwatched method, a docstring or an f-string

    # -- where we are

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.scope.append(node.name.value)
        if node.name.value in self.classes:
            self.watched_depth += 1
        return self.watched_depth > 0  # the rest of the module holds no site: not walked, once per mutant

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if original.name.value in self.classes:
            self.watched_depth -= 1
        self.scope.pop()
        return updated

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.scope.append(node.name.value)
        if node.name.value in UNWATCHED:
            self.skip_depth += 1
        return self._watching()

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if original.name.value in UNWATCHED:
            self.skip_depth -= 1
        self.scope.pop()
        return updated

    def visit_Parameters(self, node: cst.Parameters) -> bool:
        return False  # defaults are the caller's business

    def visit_FormattedString(self, node: cst.FormattedString) -> bool:
        return False  # messages

    def _watching(self) -> bool:
        return self.watched_depth > 0 and self.skip_depth == 0

    def _site(self, original: cst.CSTNode, mutated: cst.CSTNode | None, change: str):
        """Counts a site; returns the node to put in its place (the mutated one at the target)."""
        if not self._watching() or mutated is None:
            return None
        number = len(self.found)
        line = self.get_metadata(PositionProvider, original).start.line
        self.found.append((line, ".".join(self.scope), change))
        return mutated if number == self.target else None

    # -- the operators

    def leave_BinaryOperation(self, original: cst.BinaryOperation, updated: cst.BinaryOperation):
        return self._flip_sign(original, updated)

    def leave_AugAssign(self, original: cst.AugAssign, updated: cst.AugAssign):
        return self._flip_sign(original, updated)

    def _flip_sign(self, original, updated):
        """`+` and `-` (or `+=` and `-=`) swapped."""
        flipped = SIGNS.get(type(original.operator))
        if self.operator != "sign" or flipped is None:
            return updated
        mutated = updated.with_changes(operator=flipped())
        return self._site(original, mutated, f"{_code(original)} -> {_code(mutated)}") or updated

    def leave_Subscript(self, original: cst.Subscript, updated: cst.Subscript):
        if self.operator not in ("scaling dropped", "scaling squared") or not _is_scaling(original):
            return updated
        if self.operator == "scaling dropped":
            mutated = cst.Float("1.0")
        else:
            mutated = cst.BinaryOperation(
                updated, cst.Power(), cst.Integer("2"), lpar=[cst.LeftParen()], rpar=[cst.RightParen()]
            )
        return self._site(original, mutated, f"{_code(original)} -> {_code(mutated)}") or updated

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine):
        if self.operator != "statement dropped" or len(original.body) != 1:
            return updated
        statement = original.body[0]
        if not (
            isinstance(statement, cst.Del)
            or (isinstance(statement, cst.Expr) and isinstance(statement.value, cst.Call))
            or _records_an_entry(statement)
        ):
            return updated
        mutated = updated.with_changes(body=[cst.Pass()])
        return self._site(original, mutated, f"{_code(original)} -> pass") or updated

    def leave_IfExp(self, original: cst.IfExp, updated: cst.IfExp):
        if self.operator != "condition negated":
            return updated
        test = updated.test.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        mutated = updated.with_changes(test=cst.UnaryOperation(cst.Not(), test))
        return self._site(original, mutated, f"{_code(original)} -> (... if not (...) else ...)") or updated

    def leave_Call(self, original: cst.Call, updated: cst.Call):
        """A tensor's cast (`.float()`, `.to(...)`, ...) left out: the tensor as it was."""
        if self.operator != "cast dropped" or not _is_cast(original):
            return updated
        mutated = updated.func.value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        return self._site(original, mutated, f"{_code(original)} -> {_code(original.func.value)}") or updated

    def leave_If(self, original: cst.If, updated: cst.If):
        if self.operator == "check dropped" and _raises_only(original):
            mutated = cst.SimpleStatementLine([cst.Pass()])
            change = f"if {_code(original.test)}: raise ... -> (no check)"
            return self._site(original, mutated, change) or updated
        if self.operator == "condition negated":
            test = updated.test.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
            mutated = updated.with_changes(test=cst.UnaryOperation(cst.Not(), test))
            return self._site(original, mutated, f"if {_code(original.test)} -> if not (...)") or updated
        return updated

    def leave_Comparison(self, original: cst.Comparison, updated: cst.Comparison):
        if self.operator != "comparison" or len(original.comparisons) != 1:
            return updated
        target = original.comparisons[0]
        replacement = COMPARISONS.get(type(target.operator))
        if replacement is None:
            return updated
        mutated = updated.with_changes(comparisons=[updated.comparisons[0].with_changes(operator=replacement())])
        return self._site(original, mutated, f"{_code(original)} -> {_code(mutated)}") or updated

    def leave_Name(self, original: cst.Name, updated: cst.Name):
        if self.operator != "boolean flipped" or original.value not in ("True", "False"):
            return updated
        mutated = cst.Name("False" if original.value == "True" else "True")
        return self._site(original, mutated, f"{original.value} -> {mutated.value}") or updated

    def leave_SimpleString(self, original: cst.SimpleString, updated: cst.SimpleString) -> cst.SimpleString:
        return updated


OPERATORS = (
    "sign",
    "scaling dropped",
    "scaling squared",
    "statement dropped",
    "check dropped",
    "condition negated",
    "comparison",
    "boolean flipped",
    "cast dropped",
)


def mutants(source: str, classes: frozenset[str], operators: tuple[str, ...] = OPERATORS) -> list[Mutant]:
    """Every one-change mutant of `source` the operators make inside `classes`, in order of operator and site."""
    module = MetadataWrapper(cst.parse_module(source))
    made = []
    for operator in operators:
        survey = _Sites(operator, classes)
        module.visit(survey)
        for number, (line, function, change) in enumerate(survey.found):
            mutated = module.visit(_Sites(operator, classes, target=number)).code
            made.append(Mutant(operator, f"{function}, line {line}", change, mutated))
    return made


def layer_classes(source: str) -> frozenset[str]:
    """The module's top-level LoRA layer classes (a `LoraLayer` among their bases): what is mutated. The factored
    path's mode is lora_scaffold's own code, carried verbatim (lora_scaffold/factored.py): tests/test_factored.py
    answers for it, across the uses no one layer's forward reaches."""
    module = cst.parse_module(source)
    return frozenset(
        statement.name.value
        for statement in module.body
        if isinstance(statement, cst.ClassDef) and any(_code(base.value) == "LoraLayer" for base in statement.bases)
    )
