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


# MoE modules of transformers at given sizes, with the experts implementation transformers' models pick on the CPU
# (`grouped_mm`, which a module built outside a model would not get); constructors leave the weights torch.empty.


def _moe_config(config_class, hidden: int, experts: tuple[str, int], **sizes):
    config = config_class(hidden_size=hidden, num_experts_per_tok=2, **dict([experts]), **sizes)
    config._experts_implementation = "grouped_mm"
    return config


def _filled(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.02)
    return module


def mixtral_experts(hidden: int = 16, intermediate: int = 32, experts: int = 4) -> nn.Module:
    """Mixtral's expert bank: gate_up_proj [experts, 2 * intermediate, hidden], down_proj [experts, hidden,
    intermediate]; called with (hidden_states [tokens, hidden], top_k_index, top_k_weights)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = _moe_config(MixtralConfig, hidden, ("num_local_experts", experts), intermediate_size=intermediate)
    return _filled(MixtralExperts(config))


def qwen3_moe_block(hidden: int = 16, intermediate: int = 32, experts: int = 4) -> nn.Module:
    """Qwen3-MoE's sparse block: its router (`gate`) and expert bank (`experts`), on [batch, tokens, hidden]."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = _moe_config(Qwen3MoeConfig, hidden, ("num_experts", experts), moe_intermediate_size=intermediate)
    return _filled(Qwen3MoeSparseMoeBlock(config))


def routed_tokens(tokens: int, hidden: int, experts: int) -> tuple[torch.Tensor, ...]:
    """What a top-2 router hands an expert bank: the tokens, two experts each and their weights."""
    top_k_index = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    return torch.randn(tokens, hidden), top_k_index, torch.softmax(torch.randn(tokens, 2), -1)
