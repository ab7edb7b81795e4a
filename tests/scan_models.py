"""Small models for `scan`: PEFT handles some of their layers, lora-scaffold the others."""

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
