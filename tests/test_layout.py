"""layout: users' expressions laid out exactly as ruff formats them (compared with ruff itself)."""

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lora_scaffold.layout import layout
from lora_scaffold.names import expression_source


PEFT_RUFF = Path(__file__).resolve().parent / "peft_ruff.toml"
LINES = [(8, "self.target = "), (4, "return "), (4, "target = "), (8, "inputs = ")]
REAL = [
    "LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2))",
    "LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, "
    "rope_theta=10000.0, vocab_size=128))",
    "DbrxExperts(DbrxConfig(d_model=8, n_heads=2, ffn_config={'ffn_hidden_size': 12, 'moe_num_experts': 3, "
    "'moe_top_k': 2, 'moe_jitter_eps': 0.01}).ffn_config)",
    "(torch.randn(4, 8), torch.randint(0, 3, (4, 2)), torch.rand(4, 2), torch.randn(4, 8), torch.randint(0, 3, (4, 2)))",
    "(torch.randn(2, 6), {'mask': torch.ones(2, 6, dtype=torch.bool), 'positions': torch.arange(6).expand(2, 6)})",
    "torch.randn(2, 3333333333333333, 4444444444444, 555555555555555555555555, 6666666666666666).to(torch.float64).abs()",
    "x.y.z.randn(2, 3333333333333333, 4444444444444, 555555555555555555555555, 6666666666666666, 7777777).to(torch.half)",
    "Thing(*inputs_that_are_long_enough_to_matter, **{'keyword_argument_one': 1, 'keyword_argument_two': 2, 'x': 3})",
]


def random_expression(rng: random.Random, depth: int) -> str:
    """Calls, literals, attribute access and method chains, the shapes --init and --example-input take."""

    def name() -> str:
        return rng.choice(["x", "torch", "nn", "Config", "a" * rng.randint(1, 30), "b_" * rng.randint(1, 12)])

    kind = rng.random()
    if depth == 0 or kind < 0.2:
        return rng.choice([name(), str(rng.randint(0, 10 ** rng.randint(1, 20))), repr("s" * rng.randint(0, 30))])
    if kind < 0.5:
        arguments = [random_expression(rng, depth - 1) for _ in range(rng.randint(0, 4))]
        arguments += [f"{name()}={random_expression(rng, depth - 1)}" for _ in range(rng.randint(0, 3))]
        return f"{rng.choice([name(), f'{name()}.{name()}'])}({', '.join(arguments)})"
    if kind < 0.6:
        items = [random_expression(rng, depth - 1) for _ in range(rng.randint(1, 4))]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if kind < 0.7:
        return "[" + ", ".join(random_expression(rng, depth - 1) for _ in range(rng.randint(1, 4))) + "]"
    if kind < 0.8:
        return (
            "{" + ", ".join(f"{name()!r}: {random_expression(rng, depth - 1)}" for _ in range(rng.randint(1, 3))) + "}"
        )
    if kind < 0.9:
        return f"{name()}({random_expression(rng, depth - 1)}).{name()}"
    chain = f"{name()}.{name()}({random_expression(rng, depth - 1)})"
    for _ in range(rng.randint(1, 3)):
        chain += "." + rng.choice(["to", "abs", "view", "T"])
        chain += f"({random_expression(rng, depth - 1)})" if rng.random() < 0.7 else ""
    return chain


def random_expressions(count: int) -> list[str]:
    rng, expressions = random.Random(0), []
    while len(expressions) < count:
        source = expression_source(random_expression(rng, 4), "--init")
        if 90 <= len(source) <= 400:
            expressions.append(source)
    return expressions


def laid_out_file(expressions: list[str]) -> str:
    """Each expression at each kind of line generated code puts one on (in a method and in a function)."""
    method = [f"{' ' * indent}{head}{layout(e, indent, head)}" for e in expressions for indent, head in LINES]
    in_method = [line for line in method if line.startswith(" " * 8)]
    in_function = [line for line in method if not line.startswith(" " * 8)]
    return (
        "class Model:\n    def f(self):\n" + "\n".join(in_method) + "\n\n\ndef g():\n" + "\n".join(in_function) + "\n"
    )


def statements(source: str) -> list[str]:
    lines = source.splitlines()
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Return, ast.Assign))]
    return ["\n".join(lines[n.lineno - 1 : n.end_lineno]) for n in nodes]


def ruff_formatted(source: str) -> str:
    command = [sys.executable, "-m", "ruff", "format", "--config", str(PEFT_RUFF), "-"]
    return subprocess.run(command, input=source, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("expressions", [REAL, random_expressions(300)], ids=["real", "random"])
def test_layout_is_what_ruff_writes(expressions):
    ours = laid_out_file(expressions)
    differing = [(a, b) for a, b in zip(statements(ours), statements(ruff_formatted(ours))) if a != b]
    assert not differing, "\n\n".join(f"ours:\n{a}\nruff:\n{b}" for a, b in differing[:3])


@pytest.mark.parametrize(
    "names", [("weight_scale",), ("weight_scale", "weight_zero_point"), ("s" * 40, "z" * 40), ("q" * 90,)]
)
def test_an_if_test_too_long_for_its_line_is_laid_out_as_ruff_writes_it(names):
    """Patch mode's dispatch branch for an nn.Linear told apart by the tensors it holds: `isinstance(...) and
    hasattr(...)`, in dispatch_default's chain and in resolve_quantization_backend."""
    variable = "target_base_layer_with_a_long_name"
    test = f"isinstance({variable}, torch.nn.Linear)" + "".join(f' and hasattr({variable}, "{n}")' for n in names)
    source = "".join(
        f"{' ' * indent}{head}{layout(test, indent, head, ':')}:\n{' ' * (indent + 4)}pass\n"
        for indent, head in [(4, "if "), (4, "elif "), (8, "if ")]
    ).replace("    elif", "    if x:\n        pass\n    elif", 1)
    source = "def f():\n" + source.replace("        if ", "    if y:\n        if ", 1)
    assert ruff_formatted(source) == source


def test_a_short_expression_stays_on_its_line():
    assert layout("Linear(4, 5)", 4, "return ") == "Linear(4, 5)"


def test_a_tail_counts_towards_the_line_and_is_left_to_the_caller():
    test = 'isinstance(target_base_layer, getattr(sys.modules.get("transformers.models.llama.x"), "LlamaMLP", ()))'
    assert layout(test, 4, "elif ", "") == test
    assert layout(test, 4, "elif ", ":" + " " * 20) == (
        "isinstance(\n"
        '        target_base_layer, getattr(sys.modules.get("transformers.models.llama.x"), "LlamaMLP", ())\n'
        "    )"
    )
