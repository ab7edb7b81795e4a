"""Lay out a user's expression (`--init`, `--example-input`) over several lines as ruff formats it, so that the
generated files pass `ruff format --check` (PEFT's CI runs it) however long the expression is.

Ruff's rules for the expressions users write (calls, attribute access, literals): a line too long splits at its last
bracket pair, the opening bracket ending the first line, the contents one level deeper, the closing bracket (and
what follows it) starting the last line; if the first line would still be too long, at an earlier pair. The contents
stay on one line when they fit, except in a tuple, list, set or dict literal holding a comma: that one gets an item
a line, each followed by a comma, as do a call's arguments that do not fit on one line. An item still too long is
split the same way. A chain of two or more calls on call results (`x.to(d).abs()`) goes one link a line instead.
What has no brackets to split at stays on one line; tests/test_layout.py compares all this with ruff itself.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass

from lora_scaffold.names import canonical_tree


LINE_LENGTH = 119
INDENT = 4


@dataclass(frozen=True)
class Brackets:
    """An expression seen as `opening items closing`, e.g. `f(` `a, b=1` `)` or `(` `x,` `)`."""

    opening: str
    items: tuple[tuple[str, ast.expr], ...]  # (text before the item's node, such as "b=", the node)
    closing: str
    explodes: bool  # a literal holding a comma: never one line of items once split
    callee: ast.expr | None = None  # what a call's opening parenthesis follows, split in turn if still too long


def layout(source: str, indent: int, head: str = "", tail: str = "") -> str:
    """`source` laid out between `head` and `tail` on a line indented by `indent` spaces: its first line without
    the indentation and the head, the next ones with their indentation, the last without the tail."""
    lines = _lines(canonical_tree(source).body, indent, head, tail, inside_brackets=False)
    return "\n".join(lines)[len(head) : len("\n".join(lines)) - len(tail)]


def _lines(node: ast.expr, indent: int, head: str, tail: str, inside_brackets: bool = True) -> list[str]:
    """The lines `head + node + tail` takes: the first without its indentation, the others with theirs."""
    flat = head + ast.unparse(node) + tail
    if _fits(indent, flat):
        return [flat]
    if (
        isinstance(node, ast.BoolOp)
        and not inside_brackets
        and not any(isinstance(v, ast.BoolOp) for v in node.values)
    ):
        return _boolean_lines(node, indent, head, tail)
    links = _fluent_links(node)
    if links is not None:
        return _fluent_lines(links, indent, head, tail, inside_brackets)
    candidates = _splits(node)
    for index, split in enumerate(candidates):
        # An earlier pair only when what follows it fits on its closing line.
        if (index == 0 or _fits(indent, split.closing + tail)) and _fits(indent, head + split.opening):
            return _split_lines(split, indent, head, tail)
    return _split_lines(candidates[0], indent, head, tail) if candidates else [flat]


def _boolean_lines(node: ast.BoolOp, indent: int, head: str, tail: str) -> list[str]:
    """`a and b and c` too long for its line (an `if` test): in parentheses of its own, on one line there if it
    fits, else an operand a line, each after the first led by its operator. Two operands split at the last one's
    last brackets instead, where its opening and closing lines fit (one operator: ruff omits the parentheses)."""
    inner = indent + INDENT
    word = "and " if isinstance(node.op, ast.And) else "or "
    last = _splits(node.values[-1])[:1] if len(node.values) == 2 else []
    before = head + ast.unparse(node.values[0]) + " " + word
    if last and _fits(indent, before + last[0].opening) and _fits(indent, last[0].closing + tail):
        return _split_lines(last[0], indent, before, tail)
    if _fits(inner, ast.unparse(node)):
        return [head + "(", " " * inner + ast.unparse(node), " " * indent + ")" + tail]
    body = [
        line
        for index, value in enumerate(node.values)
        for line in _indented(_lines(value, inner, word if index else "", ""), inner)
    ]
    return [head + "(", *body, " " * indent + ")" + tail]


def _split_lines(split: Brackets, indent: int, head: str, tail: str) -> list[str]:
    inner = indent + INDENT
    items = [prefix + ast.unparse(item) for prefix, item in split.items]
    if not split.explodes and _fits(inner, ", ".join(items)):
        body = [" " * inner + ", ".join(items)]
    elif len(items) == 1 and not split.explodes:
        prefix, item = split.items[0]
        body = _indented(_lines(item, inner, prefix, ""), inner)
    else:
        body = [line for prefix, item in split.items for line in _indented(_lines(item, inner, prefix, ","), inner)]
    opening = [head + split.opening]
    if split.callee is not None and not _fits(indent, opening[0]):
        opening = _lines(split.callee, indent, head, "(")
    return [*opening, *body, " " * indent + split.closing + tail]


def _fluent_lines(links: list[ast.expr], indent: int, head: str, tail: str, inside_brackets: bool) -> list[str]:
    """`root` then `.link(...)` a line each; outside brackets, inside parentheses of its own (on one line there if
    it fits)."""
    inner = indent if inside_brackets else indent + INDENT
    if not inside_brackets and _fits(inner, ast.unparse(links[-1])):
        return [head + "(", " " * inner + ast.unparse(links[-1]), " " * indent + ")" + tail]
    lines = _lines(links[0], inner, head if inside_brackets else "", "")
    for previous, link in zip(links, links[1:]):
        last = link is links[-1] and inside_brackets
        lines += _indented(_link_lines(previous, link, inner, tail if last else ""), inner)
    if inside_brackets:
        return lines
    return [head + "(", *_indented(lines, inner), " " * indent + ")" + tail]


def _link_lines(previous: ast.expr, link: ast.expr, indent: int, tail: str) -> list[str]:
    """The part of `link` after `previous` (`.to(dtype)`), split at its own call's parentheses if too long."""
    text = ast.unparse(link)[len(ast.unparse(previous)) :] + tail
    split = _splits(link)[0] if isinstance(link, ast.Call) and link.args + link.keywords else None
    if _fits(indent, text) or split is None:
        return [text]
    opening = split.opening[len(ast.unparse(previous)) :]
    return _split_lines(Brackets(opening, split.items, split.closing, False), indent, "", tail)


def _fluent_links(node: ast.expr) -> list[ast.expr] | None:
    """The chain's root and each longer piece ending before the next attribute of a call's result (ruff's fluent
    layout), or None when fewer than two attributes follow a call: `[x.f(), x.f().to(d), x.f().to(d).abs()]`."""
    cuts, current = [node], node
    while isinstance(current, (ast.Attribute, ast.Call, ast.Subscript)):
        inner = current.func if isinstance(current, ast.Call) else current.value
        if isinstance(current, ast.Attribute) and isinstance(inner, (ast.Call, ast.Subscript)):
            cuts.append(inner)
        current = inner
    if len(cuts) < 3:
        return None
    links = list(reversed(cuts))
    texts = [ast.unparse(link) for link in links]
    # A link that unparse writes with parentheses of its own ((a + b).c) is not a plain prefix: no fluent layout.
    return links if all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])) else None


def _splits(node: ast.expr) -> list[Brackets]:
    """The bracket pairs ruff may split the expression at, its last one first; what follows a pair is in its
    closing text (`Config(...).ffn_config`)."""
    if isinstance(node, ast.Call):
        arguments = [("*", a.value) if isinstance(a, ast.Starred) else ("", a) for a in node.args]
        arguments += [(f"{k.arg}=" if k.arg else "**", k.value) for k in node.keywords]
        own = [Brackets(ast.unparse(node.func) + "(", tuple(arguments), ")", False, node.func)] if arguments else []
        call = "(" + ast.unparse(node)[len(ast.unparse(node.func)) + 1 :]
        return own + [_followed_by(split, call) for split in _splits(node.func)]
    if isinstance(node, ast.Attribute):
        return [_followed_by(split, f".{node.attr}") for split in _splits(node.value)]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        opening, closing = {ast.Tuple: "()", ast.List: "[]", ast.Set: "{}"}[type(node)]
        explodes = len(node.elts) > 1 or isinstance(node, ast.Tuple)
        return [Brackets(opening, tuple(("", element) for element in node.elts), closing, explodes)]
    if isinstance(node, ast.Dict) and node.keys and all(key is not None for key in node.keys):
        items = tuple((f"{ast.unparse(key)}: ", value) for key, value in zip(node.keys, node.values))
        return [Brackets("{", items, "}", len(items) > 1)]
    return []


def _followed_by(split: Brackets, text: str) -> Brackets:
    return Brackets(split.opening, split.items, split.closing + text, split.explodes, split.callee)


def _fits(indent: int, text: str) -> bool:
    return indent + len(text) <= LINE_LENGTH


def _indented(lines: list[str], indent: int) -> list[str]:
    return [" " * indent + lines[0], *lines[1:]]


def string_lines(text: str, indent: int) -> tuple[str, ...]:
    """`text` as string literals to write one a line at `indent` (implicit concatenation), each line within
    LINE_LENGTH, split after spaces: what ruff leaves to the writer, since it never splits a string."""
    room = LINE_LENGTH - indent - 2  # the quotes
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(json.dumps(candidate + " ")) - 2 > room:
            lines.append(current + " ")
            current = word
        else:
            current = candidate
    return tuple(json.dumps(line) for line in [*lines, current])


def assigned_string(head: str, text: str) -> str:
    """`head + literal` on one line when it fits, else the literal split in parentheses (a module-level constant)."""
    one_line = json.dumps(text)
    if len(head) + len(one_line) <= LINE_LENGTH:
        return one_line
    inner = "\n".join(f"{' ' * INDENT}{line}" for line in string_lines(text, INDENT))
    return f"(\n{inner}\n)"
