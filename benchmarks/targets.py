"""Modules the benchmark adapts that PEFT has no layer for: each takes the `delta` strategy."""

import torch
import torch.nn.functional as F
from torch import nn


class WSConv2d(nn.Conv2d):
    """A weight-standardised convolution (as in NFNets/BiT): the forward normalises the weight, so LoRA cannot be
    factored out of it and only `W + dW` through the module's own forward is exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StackedExperts(nn.Module):
    """Experts' weights in one `[experts, in, out]` parameter, as Mixtral-style MoE blocks keep them; the input is
    already dispatched, `[experts, tokens, in]`."""

    def __init__(self, num_experts: int = 4, in_features: int = 6, out_features: int = 5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, in_features, out_features) / in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight)
