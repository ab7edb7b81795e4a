"""The numerical probe: what a change of the weight does to the output, measured in float64.

For a random D, `f(x; W + D) - f(x; W)` is measured through `torch.func.functional_call`; each strategy compares
it with what its factored path would add for the same D (`strategies/`). Float64 makes a match unambiguous.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from lora_scaffold.sample_input import flatten_output


RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
NOT_ONE_TENSOR = float("inf")


class Probe:
    """A float64 copy of the module with the chosen weight and inputs; everything the strategies are tested on."""

    def __init__(self, module: nn.Module, weight_name: str, inputs: tuple):
        self.module, self.inputs = _high_precision(module, inputs)
        self.module.eval()
        self.weight_name = weight_name
        self.weight = self.module.get_parameter(weight_name).detach()
        generator = torch.Generator().manual_seed(1)
        scale = float(self.weight.std()) if self.weight.numel() > 1 and float(self.weight.std()) > 0 else 1.0
        self.delta = torch.randn(self.weight.shape, generator=generator, dtype=self.weight.dtype) * scale
        self.output = self.run({weight_name: self.weight})
        after = self.run({weight_name: self.weight + self.delta})
        self.effect = [
            a - b for a, b in zip(after, self.output) if isinstance(a, torch.Tensor) and a.is_floating_point()
        ]

    @property
    def x(self):
        """The first input, which factored paths transform."""
        return self.inputs[0]

    @property
    def floating_input(self) -> bool:
        return isinstance(self.x, torch.Tensor) and self.x.is_floating_point()

    def run(self, tensors: dict[str, torch.Tensor]) -> list:
        """The flattened output with some parameters replaced."""
        with torch.no_grad():
            return flatten_output(functional_call(self.module, tensors, self.inputs))

    def weight_matters(self) -> bool:
        return any(bool((e != 0).any()) for e in self.effect)

    def error(self, predicted: torch.Tensor | None, observed: list | None = None) -> float:
        """Relative error of `predicted` against `observed` (default: the change of the output); inf when the
        output is not one tensor of the predicted shape."""
        observed = self.effect if observed is None else observed
        if predicted is None or len(observed) != 1 or observed[0].shape != predicted.shape:
            return NOT_ONE_TENSOR
        scale = max(float(predicted.abs().max()), 1e-12)
        return float((observed[0] - predicted).abs().max()) / scale

    def exact(self, error: float) -> bool:
        return error <= RELATIVE_TOLERANCE[self.weight.dtype]

    def random_like(self, tensor: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed), dtype=tensor.dtype)


def _high_precision(module: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    copied = copy.deepcopy(module)
    try:
        doubled = copied.double()
        cast = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        with torch.no_grad():
            doubled(*cast)
        return doubled, cast
    except Exception:
        return copy.deepcopy(module).float(), inputs
