"""Small models for `scan`: PEFT handles some of their layers, lora-scaffold the others."""

import math

import torch
import torch.nn.functional as F
from scaffold_targets import PlainLinear, SquaredConv
from torch import nn


def small_model() -> nn.Module:
    return nn.Sequential(
        SquaredConv(3, 4, 3, padding=1), nn.Flatten(), PlainLinear(4 * 6 * 6, 5), nn.LayerNorm(5), nn.Linear(5, 2)
    )


class Int8Linear(nn.Module):
    """Quantizes its weight when built, as hqq's HQQLinear and bitsandbytes' layers do: reading the scale's value
    (`.item()`) cannot happen on the meta device, so a model holding it must be built for real."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        weight = torch.randn(out_features, in_features)
        self.scale = weight.abs().max().item() / 127
        self.register_buffer("qweight", (weight / self.scale).round().to(torch.int8))
        self.up = nn.Parameter(torch.randn(out_features, out_features) / out_features**0.5)

    def forward(self, x):
        return F.linear(F.linear(x, self.qweight.float() * self.scale), self.up)


def quantized_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), Int8Linear(8, 5))


class MixedDtypeRouter(nn.Module):
    """Returns logits in the model's dtype, scores in float32 and int64 indices, as transformers' routers do."""

    def __init__(self, hidden: int = 8, experts: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) / hidden**0.5)

    def forward(self, x):
        logits = F.linear(x, self.weight)
        scores, indices = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), 2, dim=-1)
        return logits, scores, indices


def routed_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), MixedDtypeRouter())


class ScaledRows(nn.Module):
    """A per-row scale: a weight of two dimensions PEFT has no layer for."""

    def __init__(self, rows: int = 4, width: int = 8):
        super().__init__()
        self.weight = nn.Parameter(1 + torch.randn(rows, width) / 4)

    def forward(self, x, row):
        return x * self.weight[row]


class ExpertsWithNorm(nn.Module):
    """An expert bank that holds its own per-expert scale as a submodule, as transformers' ErgoExperts does: both
    are adapted, the child inside the parent's base module."""

    def __init__(self, experts: int = 4, width: int = 8):
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, width, width) / width**0.5)
        self.norm = ScaledRows(experts, width)

    def forward(self, x):
        expert = torch.arange(x.shape[0]) % self.up.shape[0]
        return self.norm(torch.einsum("ti,tio->to", x, self.up[expert]), expert)


def nested_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), ExpertsWithNorm())


class PassedWeight(nn.Module):
    """Holds a weight its own forward does not read: it is given it (DBRX's DbrxExpertGLU)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x, weight):
        return F.linear(x, weight)


class ReadsChildWeight(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.mlp = PassedWeight(width)

    def forward(self, x):
        return self.mlp(x, self.mlp.weight.view(self.mlp.weight.shape))


def passed_weight_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), ReadsChildWeight())


class ScaledLookup(nn.Module):
    def __init__(self, rows: int = 16, width: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, width))

    def forward(self, ids):
        return F.embedding(ids, self.weight) * 2.0


class SharedTable(nn.Module):
    """T5's and NLLB's `shared`: a table the model never calls, tied to the encoder's `embed_tokens`, which it does."""

    def __init__(self):
        super().__init__()
        self.shared = ScaledLookup()
        self.embed_tokens = ScaledLookup()
        self.embed_tokens.weight = self.shared.weight
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.embed_tokens(ids))


def shared_table_model() -> nn.Module:
    return SharedTable()


class UnfilledBank(nn.Module):
    """Leaves its bank `torch.empty` for an init that never comes (transformers' Qwen3-Omni talker's experts)."""

    def __init__(self, experts: int = 2, width: int = 8):
        super().__init__()
        self.bank = nn.Parameter(torch.empty(experts, width, width))

    def forward(self, x):
        return torch.einsum("ti,eio->to", x, self.bank)


def unfilled_model() -> nn.Module:
    """Garbage upstream of a layer PEFT cannot adapt: its input is only what the model feeds it if both the tool and
    the tests fill the garbage the same way."""
    return nn.Sequential(UnfilledBank(), ExpertsWithNorm())


class ReadsLinearWeight(nn.Module):
    """Keeps its projection as an nn.Linear but applies the weight itself (LongCat's router and its classifier)."""

    def __init__(self, width: int = 8, experts: int = 4):
        super().__init__()
        self.classifier = nn.Linear(width, experts, bias=False)

    def forward(self, x):
        return F.linear(x.float(), self.classifier.weight.float()).softmax(-1)


def direct_read_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), ReadsLinearWeight())


class ReadsConvStride(nn.Module):
    """Reads an attribute of its convolution that PEFT's lora.Conv1d does not pass on (MOSS's audio encoder)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3)

    def forward(self, x):
        return self.conv(x)[..., :: self.conv.stride[0]]


def stride_reading_model() -> nn.Module:
    return nn.Sequential(ReadsConvStride())


class AttentionPool(nn.Module):
    """A query attending over the sequence (SigLIP's pooling head): nn.MultiheadAttention applies its `out_proj`, a
    NonDynamicallyQuantizableLinear, by reading the weight, never by calling it."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x[:, :1], x, x)[0]


def attention_pool_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), AttentionPool())


class FaintBranch(nn.Module):
    """A branch whose effect at init is below float32's resolution of the output (behind a decay of exp(-20), as
    Qwen3.5's gated delta rule is at init with few heads): live, though a small change of its adapter leaves the
    output bit-for-bit as it was."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return x + math.exp(-20) * self.proj(x)


def faint_model() -> nn.Module:
    return nn.Sequential(FaintBranch())


class TokenTypeBranches(nn.Module):
    """Rows of one kind go through `text`, rows of another through `audio` (Higgs Audio's decoder layer): on an
    input without the second kind, `audio` is called on an empty batch."""

    def __init__(self):
        super().__init__()
        self.text, self.audio = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        is_audio = x[:, 0] > 1e9
        out = torch.zeros_like(x)
        out[~is_audio] = self.text(x[~is_audio])
        out[is_audio] = self.audio(x[is_audio])
        return out


def token_type_model() -> nn.Module:
    return nn.Sequential(TokenTypeBranches())


class SpareBank(nn.Module):
    """Holds a larger weight its forward never reads (a spare bank) beside the one it does: scan names the larger."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.spare = nn.Parameter(torch.randn(4 * width, width))
        self.used = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x):
        return x @ self.used


def spare_bank_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 6), SpareBank())


class LengthTable(nn.Module):
    """Called with a plain int, the sequence length (SAM3-Lite's text position embedding)."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 16, width))

    def forward(self, length: int) -> torch.Tensor:
        return self.table[:, :length]


class LengthTableModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.position = LengthTable()

    def forward(self, x):
        return x + self.position(x.shape[1])


def length_table_model() -> nn.Module:
    return LengthTableModel()
