"""Random module classes for the property test: a seeded generator writes their source, as users' layers would be
written, with forwards that are and are not linear in the weight (the probe must tell them apart)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RandomClass:
    name: str
    source: str
    args: tuple[str, ...]  # --arg values `new` needs
    weight: str | None  # --weight, when the class has several candidates
    formula: str


HEADER = "import math\n\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n"

# formula -> (weight shape from (out, inn, k), forward body using W/x; `{extra}` are more statements in __init__)
FORMULAS = {
    "linear": ("(out, inn)", "return F.linear(x, self.weight, self.bias)"),
    "linear_in_out": ("(inn, out)", "return x @ self.weight + self.bias"),
    "scaled": ("(out, inn)", "return 2.5 * F.linear(x, self.weight)"),
    "gain": ("(out, inn)", "return F.linear(x, self.weight) * self.gain"),
    "tanh": ("(out, inn)", "return torch.tanh(F.linear(x, self.weight, self.bias))"),
    "relu": ("(out, inn)", "return torch.relu(x @ self.weight.T + self.bias)"),
    "squared": ("(out, inn)", "return x @ (self.weight * self.weight.abs()).T"),
    "twice": ("(out, inn)", "return x @ self.weight.T + 0.1 * (x @ self.weight.T) ** 2"),
    "normalised": ("(out, inn)", "return x @ (self.weight / self.weight.norm(dim=1, keepdim=True)).T"),
    "extra": ("(out, inn)", "return x @ self.weight.T + x @ self.other.T"),
    "conv1d": ("(out, inn, k)", "return F.conv1d(x, self.weight, self.bias, self.stride, self.padding)"),
    "conv2d": ("(out, inn, k, k)", "return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)"),
    "conv2d_gain": ("(out, inn, k, k)", "return F.conv2d(x, self.weight, None, 1, self.padding) * self.gain"),
    "conv2d_squared": ("(out, inn, k, k)", "return F.conv2d(x, self.weight**2, None, 1, self.padding)"),
    "bilinear": ("(out, inn, inn)", "return torch.einsum('bi,oij,bj->bo', x, self.weight, x)"),
    "rank1": ("(out,)", "return x * self.weight"),
    "rank0": ("(())", "return x * self.weight"),
}
CONV_INPUT = {"conv1d": "torch.randn(2, {inn}, 9)", "conv2d": "torch.randn(2, {inn}, 8, 8)"}


def random_classes(count: int, seed: int = 2026) -> list[RandomClass]:
    rng = random.Random(seed)
    names = sorted(FORMULAS)
    return [_random_class(f"Random{index:03d}", names[index % len(names)], rng) for index in range(count)]


def _random_class(name: str, formula: str, rng: random.Random) -> RandomClass:
    shape, body = FORMULAS[formula]
    out, inn, k = rng.choice([3, 5, 6]), rng.choice([4, 7]), rng.choice([1, 3])
    required = rng.random() < 0.3  # sizes the generator cannot guess: --arg needed
    ctor = "self, width, depth" if required else f"self, width={inn}, depth={out}"
    args = (f"width={inn}", f"depth={out}") if required else ()
    lines = [
        f"class {name}(nn.Module):",
        f"    def __init__({ctor}):",
        "        super().__init__()",
        "        out, inn, k = depth, width, " + str(k),
        f"        self.weight = nn.Parameter(torch.randn{shape} / math.sqrt(inn))",
        "        self.bias = nn.Parameter(torch.zeros(out))",
        "        self.gain = nn.Parameter(torch.ones(out, *([1, 1] if k == 0 else [])))",
        "        self.other = nn.Parameter(torch.randn(out, inn)) if " + str(formula == "extra") + " else None",
        f"        self.stride, self.padding, self.dilation, self.groups = {rng.choice([1, 2])}, {rng.choice([0, 1])}, 1, 1",
        "",
        "    def forward(self, x):",
        f"        {body}",
    ]
    source = "\n".join(lines) + "\n"
    if formula == "conv2d_gain":
        source = source.replace("torch.ones(out, *([1, 1] if k == 0 else []))", "torch.ones(out, 1, 1)")
    weight = "weight" if formula in ("rank0", "rank1") else None  # not a candidate without being named
    return RandomClass(name, source, args, weight, formula)


def module_source(classes: list[RandomClass]) -> str:
    return HEADER + "".join(f"\n\n{c.source}" for c in classes)
