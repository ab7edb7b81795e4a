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


class KeywordWeight(nn.Linear):
    """F.linear with its weight and bias by keyword (IBert's QuantLinear calls it so)."""

    def forward(self, x):
        return F.linear(x, weight=self.weight, bias=self.bias) + F.linear(input=x, weight=self.weight)


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
    + [(WeightFirst(6, 4), "its product"), (KeywordWeight(6, 4), "each of its 2 products")],
    ids=["Linear", "ScaledTwice", "Transposes", "WeightFirst", "KeywordWeight"],
)
def test_products_with_the_weight_or_its_transpose_are_factored_and_proven(module, products):
    proven, found = factored_proof(module, "weight", call)
    assert proven and f"adds the low-rank term to {products} " in found, found


@pytest.mark.parametrize("module", [Gram(6, 6), Standardised(6, 4)], ids=["Gram", "Standardised"])
def test_a_forward_multiplying_no_input_by_the_weight_keeps_w_plus_dw(module):
    proven, found = factored_proof(module, "weight", call)
    assert not proven and found.startswith("its forward uses the weight in no way the factored path takes (F.linear")


class ReluConv2d(nn.Conv2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


class ReluEmbedding(nn.Embedding):
    def forward(self, ids):
        return torch.relu(super().forward(ids))


def images(seed, channels=3):
    return (torch.randn(2, channels, 7, 7, generator=torch.Generator().manual_seed(seed)),), {}


def ids(seed):
    return (torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(seed)),), {}


@pytest.mark.parametrize(
    "module, inputs",
    [
        (ReluConv2d(3, 4, 3, stride=2, padding=1), images),
        (ReluConv2d(3, 4, 3, padding=1, dilation=2, padding_mode="circular"), images),
        (
            nn.Conv1d(3, 4, 3),
            lambda seed: ((torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(seed)),), {}),
        ),
        (ReluEmbedding(10, 6), ids),
        (ReluEmbedding(10, 6, padding_idx=0), ids),  # the padding row's term gets no gradient, as W + dW's would not
        (ReluEmbedding(10, 6, padding_idx=-3), ids),
        (nn.Bilinear(5, 3, 6), lambda seed: ((torch.randn(4, 5), torch.randn(4, 3)), {})),
    ],
    ids=[
        *("conv2d_strided", "conv2d_circular_dilated", "conv1d"),
        *("embedding", "embedding_padding", "padding_negative", "bilinear"),
    ],
)
def test_convolutions_embeddings_and_bilinear_forms_of_the_weight_are_factored_and_proven(module, inputs):
    proven, found = factored_proof(module, "weight", inputs)
    assert proven and "adds the low-rank term to its product with W " in found, found


@pytest.mark.parametrize(
    "module, inputs",
    [
        (ReluConv2d(4, 4, 3, groups=2), lambda seed: images(seed, channels=4)),
        (ReluEmbedding(10, 6, scale_grad_by_freq=True), ids),  # would scale L's rows, not R's
        (ReluEmbedding(10, 6, max_norm=1.0), ids),  # rewrites W in place
    ],
    ids=["grouped_conv", "scale_grad_by_freq", "max_norm"],
)
def test_grouped_convolutions_and_rewriting_embeddings_keep_w_plus_dw(module, inputs):
    assert factored_proof(module, "weight", inputs)[0] is False


def test_other_uses_read_w_plus_dw_built_once_and_metadata_builds_nothing():
    module = WeightFirst(6, 4)
    weight = module.weight
    weight_A, weight_B = torch.randn(2, 6), torch.randn(4, 2)
    builds = []

    def effective():
        builds.append(1)
        return weight + 0.5 * weight_B @ weight_A

    x = torch.randn(3, 6)
    with torch.no_grad(), FactoredWeightUses(weight, [(0.5 * weight_B, weight_A)], effective) as mode:
        factored = module(x)
        assert weight.shape == (4, 6) and weight.dtype == torch.float32
    expected = ((weight + 0.5 * weight_B @ weight_A) @ x.T).T * (weight + 0.5 * weight_B @ weight_A).norm()
    torch.testing.assert_close(factored, expected)
    assert (mode.factored, mode.materialised, len(builds)) == (1, 1, 1)


# Expert banks: W [experts, out, in], one pair per expert (L [experts, out, r], R [experts, r, in]).
EXPERTS, OUT, IN = 3, 8, 16


class Bank(nn.Module):
    def __init__(self, shape=(EXPERTS, OUT, IN)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape) / IN**0.5)


class LoopedBank(Bank):
    """transformers' eager experts: F.linear with each routed expert's slice W[e] (a 0-dim tensor index)."""

    def forward(self, x, expert):
        out = torch.zeros(x.shape[0], OUT, dtype=x.dtype)
        for e in expert.unique():
            rows = torch.where(expert == e)[0]
            out[rows] = torch.relu(F.linear(x[rows], self.weight[e]))
        return out


class GatheredBank(Bank):
    """transformers' batched_mm: each token's expert gathered, W[ids] [tokens, out, in], then bmm with W first."""

    def forward(self, x, expert):
        return torch.bmm(self.weight[expert], x.unsqueeze(-1)).squeeze(-1)


class GroupedBank(Bank):
    """transformers' grouped_mm: tokens sorted by expert, grouped_mm with the transposed bank and the offsets."""

    def forward(self, x, expert):
        order = torch.argsort(expert)
        offsets = torch.cumsum(torch.bincount(expert, minlength=EXPERTS), 0).to(torch.int32)
        out = F.grouped_mm(x[order], self.weight.transpose(-2, -1), offs=offsets)
        return out[torch.argsort(order)]


class FlatBank(Bank):
    """DBRX: the bank flattened along its rows, [experts * out, in], viewed back as [experts, out, in]."""

    def __init__(self):
        super().__init__((EXPERTS * OUT, IN))

    def forward(self, x, expert):
        return F.linear(x, self.weight.view(EXPERTS, OUT, IN)[expert[0]])


class VectorTimesBank(Bank):
    """x @ W with x a vector: it would broadcast against the experts, so it is not factored."""

    def forward(self, x, expert):
        return x[0] @ self.weight.transpose(1, 2)


def routed(seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(10, IN, generator=generator), torch.randint(0, EXPERTS, (10,), generator=generator)), {}


@pytest.mark.parametrize(
    "module, dtype, products",
    [
        (LoopedBank(), torch.float64, "each of its 3 products"),
        (GatheredBank(), torch.float64, "its product"),
        (GroupedBank(), torch.float32, "its product"),  # torch's grouped_mm takes no float64
        (FlatBank(), torch.float64, "its product"),
    ],
    ids=["looped", "gathered", "grouped", "flattened"],
)
def test_an_expert_banks_products_with_its_slices_are_factored_and_proven(module, dtype, products):
    proven, found = factored_proof(module, "weight", routed, (EXPERTS, OUT, IN), dtype)
    assert proven and f"adds the low-rank term to {products} with an expert's slice of W " in found, found
    assert ("in float32" in found) == (dtype == torch.float32)


def test_a_vector_times_a_bank_reads_w_plus_dw():
    assert factored_proof(VectorTimesBank(), "weight", routed, (EXPERTS, OUT, IN))[0] is False


def test_a_flattened_banks_own_uses_read_w_plus_dw_of_the_whole_bank():
    module = FlatBank()
    weight = module.weight
    left, right = torch.randn(EXPERTS, OUT, 2), torch.randn(EXPERTS, 2, IN)
    change = (left @ right).reshape(weight.shape)
    x = torch.randn(4, IN)
    with torch.no_grad(), FactoredWeightUses(weight, [(left, right)], lambda: weight + change) as mode:
        rows = F.linear(x, weight)  # [experts * out, in] as it is: not the pairs' shape
        sliced = F.linear(x, weight.view(EXPERTS, OUT, IN)[1])
    torch.testing.assert_close(rows, F.linear(x, weight + change))
    torch.testing.assert_close(sliced, F.linear(x, (weight + change).view(EXPERTS, OUT, IN)[1]))
    assert (mode.factored, mode.materialised) == (1, 1)


@pytest.mark.parametrize(
    "index, leading, picks",
    [
        (1, 1, True),
        (torch.tensor(1), 1, True),
        (torch.tensor([0, 2, 2]), 1, True),
        ((slice(None), 0), 2, True),
        (torch.tensor([True, False, True]), 1, True),
        ((0, 1), 1, False),  # reaches into a matrix
        (None, 1, False),
        (Ellipsis, 1, False),
        (True, 1, False),
        ([0, 1], 1, False),
        (torch.tensor([0.0]), 1, False),
    ],
)
def test_only_picks_among_experts_keep_their_pairs(index, leading, picks):
    from lora_scaffold.factored import _indexes_leading

    assert _indexes_leading(index, leading) is picks
