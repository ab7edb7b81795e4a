"""Name the new type in the error `LoraModel._create_new_module` raises for an unsupported module ("Currently, only
the following modules are supported: `torch.nn.Linear`, ..."): PEFT's maintainers ask for that list to be updated
with every new layer type. A message of another shape is left alone; `new` says so."""

from __future__ import annotations

import ast

import libcst as cst

from lora_scaffold.patch.cst_utils import Edit, excerpt


MODEL_FILE = "src/peft/tuners/lora/model.py"
LIST_START = "Currently, only the following modules are supported: "
LAST_ENTRY = "`torch.nn.MultiheadAttention"


def supported_edit(qualified_name: str) -> Edit:
    return Edit(
        MODEL_FILE,
        lambda source: add_supported(source, qualified_name),
        lambda source, force: remove_supported(source, qualified_name),
    )


def entry(qualified_name: str) -> str:
    """The string piece added, as it stands in the source: `"`pkg.Class`, "`."""
    return f'"`{qualified_name}`, "'


def message_found(source: str) -> bool:
    return _message(_view(source).module) is not None


def add_supported(source: str, qualified_name: str) -> str:
    """The piece goes before the list's last entry (MultiheadAttention), on a line of its own, as the others."""
    view = _view(source)
    found = _message(view.module)
    if found is None or any(_text(piece) == entry(qualified_name) for piece in _pieces(found)):
        return source
    transformer = _Insert(found, qualified_name)
    return view.code(view.module.visit(transformer))


def remove_supported(source: str, qualified_name: str) -> str:
    view = _view(source)
    found = _message(view.module)
    if found is None or not any(_text(piece) == entry(qualified_name) for piece in _pieces(found)):
        return source
    return view.code(view.module.visit(_Remove(qualified_name)))


def _view(source: str):
    return excerpt(source, MODEL_FILE, lambda statement: isinstance(statement, ast.ClassDef), _holds_list_start)


def _holds_list_start(method: ast.stmt) -> bool:
    return any(
        isinstance(node, ast.Constant) and isinstance(node.value, str) and LIST_START in node.value
        for node in ast.walk(method)
    )


def _message(module: cst.Module) -> cst.ConcatenatedString | None:
    """The implicitly concatenated string that lists the supported modules, ending with MultiheadAttention."""
    found = []

    class Finder(cst.CSTVisitor):
        def visit_ConcatenatedString(self, node: cst.ConcatenatedString) -> bool:
            pieces = _pieces(node)
            texts = "".join(_text(piece) for piece in pieces)
            if LIST_START in texts and LAST_ENTRY in _text(pieces[-1]):
                found.append(node)
            return False

    module.visit(Finder())
    return found[0] if len(found) == 1 else None


def _text(piece: cst.BaseString) -> str:
    return cst.Module([]).code_for_node(piece)


def _pieces(node) -> list[cst.BaseString]:
    """The string literals of an implicit concatenation, first to last."""
    if isinstance(node, cst.ConcatenatedString):
        return _pieces(node.left) + _pieces(node.right)
    return [node]


class _Insert(cst.CSTTransformer):
    """`A B C MHA` becomes `A B C NEW MHA`: the last concatenation's left gains the new piece, with the same line
    break and indentation as the break before MHA."""

    def __init__(self, target: cst.ConcatenatedString, qualified_name: str):
        self.target = target
        self.qualified_name = qualified_name

    def leave_ConcatenatedString(self, original: cst.ConcatenatedString, updated: cst.ConcatenatedString):
        if original is not self.target:
            return updated
        return self._insert(updated)

    def _insert(self, node: cst.ConcatenatedString) -> cst.ConcatenatedString:
        if isinstance(node.right, cst.ConcatenatedString):
            return node.with_changes(right=self._insert(node.right))
        new_piece = cst.SimpleString(entry(self.qualified_name))
        middle = cst.ConcatenatedString(left=new_piece, right=node.right, whitespace_between=node.whitespace_between)
        return node.with_changes(right=middle)


class _Remove(cst.CSTTransformer):
    def __init__(self, qualified_name: str):
        self.piece = entry(qualified_name)

    def leave_ConcatenatedString(self, original: cst.ConcatenatedString, updated: cst.ConcatenatedString):
        left = updated.left
        if isinstance(left, cst.SimpleString) and left.value == self.piece:
            return updated.right
        if isinstance(updated.right, cst.SimpleString) and updated.right.value == self.piece:
            return left
        return updated
