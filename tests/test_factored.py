"""delta's factored path: the proof analysis runs before a layer takes it, and the mode the layer runs its base under."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_scaffold.factored import FactoredWeightUses, factored_proof


def call(seed):
    return (torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)),), {}


class ScaledTwice(nn.Linear):
    """F.linear of W and of 2W: the first is factored, the second reads W + dW."""

    def forward(self, x):
        return F.linear(x, self.weight * 2) + F.linear(x, self.weight)


class Transposes(nn.Linear):
    def forward(self, x):
        return torch.tanh(x @ self.weight.t()) + x @ self.weight.T + torch.matmul(x, self.weight.transpose(0, 1))


class WeightFirst(nn.Linear):
    """W @ x^T, scaled by a norm of W (which reads W + dW)."""

    def forward(self, x):
        return (self.weight @ x.T).T * self.weight.norm()


class Gram(nn.Linear):
    """x W^T W: a product of the weight with itself, not with an input."""

    def forward(self, x):
        return x @ (self.weight.T @ self.weight)


class Standardised(nn.Linear):
    def forward(self, x):
        w = self.weight
        return F.linear(x, (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True))


@pytest.mark.parametrize(
    "module, products",
    [
        (nn.Linear(6, 4), "its product"),
        (ScaledTwice(6, 4), "its product"),
        (Transposes(6, 4), "each of its 3 products"),
    ]
    + [(WeightFirst(6, 4), "its product")],
    ids=["Linear", "ScaledTwice", "Transposes", "WeightFirst"],
)
def test_products_with_the_weight_or_its_transpose_are_factored_and_proven(module, products):
    proven, found = factored_proof(module, "weight", call)
    assert proven and f"adds the low-rank term to {products} " in found, found


@pytest.mark.parametrize("module", [Gram(6, 6), Standardised(6, 4)], ids=["Gram", "Standardised"])
def test_a_forward_multiplying_no_input_by_the_weight_keeps_w_plus_dw(module):
    assert factored_proof(module, "weight", call) == (
        False,
        "its forward multiplies no input by the weight (F.linear, matmul)",
    )


def test_a_weight_that_is_not_a_matrix_is_not_tried():
    assert factored_proof(nn.Conv2d(3, 4, 3), "weight", lambda seed: ((torch.randn(1, 3, 5, 5),), {})) == (
        False,
        "its weight is not a matrix",
    )


def test_other_uses_read_w_plus_dw_built_once_and_metadata_builds_nothing():
    module = WeightFirst(6, 4)
    weight = module.weight
    weight_A, weight_B = torch.randn(2, 6), torch.randn(4, 2)
    builds = []

    def effective():
        builds.append(1)
        return weight + 0.5 * weight_B @ weight_A

    x = torch.randn(3, 6)
    with torch.no_grad(), FactoredWeightUses(weight, [(weight_A, weight_B, 0.5)], effective) as mode:
        factored = module(x)
        assert weight.shape == (4, 6) and weight.dtype == torch.float32
    expected = ((weight + 0.5 * weight_B @ weight_A) @ x.T).T * (weight + 0.5 * weight_B @ weight_A).norm()
    torch.testing.assert_close(factored, expected)
    assert (mode.factored, mode.materialised, len(builds)) == (1, 1, 1)
