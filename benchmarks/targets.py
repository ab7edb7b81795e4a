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


# Quantized bases, each built small for generation and at benchmark size for timing; the seed makes each build the
# same base (hqq's layer cannot be deep-copied).


def hqq_linear(in_features: int = 16, out_features: int = 8, bits: int = 4) -> nn.Module:
    """hqq's HQQLinear on its pytorch backend (PEFT's peer: HqqLoraLinear)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = BaseQuantizeConfig(nbits=bits, group_size=64 if in_features % 64 == 0 else 8)
    return HQQLinear(nn.Linear(in_features, out_features), config, compute_dtype=torch.float32, device="cpu")


def torchao_int8_linear(in_features: int = 16, out_features: int = 8) -> nn.Module:
    """nn.Linear with torchao's int8 weight-only Int8Tensor weight (PEFT's peer: TorchaoLoraLinear)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(in_features, out_features))
    quantize_(model, Int8WeightOnlyConfig())
    return model[0]


def bnb_linear4(in_features: int = 64, out_features: int = 32) -> nn.Module:
    """bitsandbytes' Linear4bit nf4 on the CPU (PEFT's peer: its bnb Linear4bit, on a model flagged 4-bit)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(nn.Linear(in_features, out_features).state_dict())
    return layer.to("cpu")
