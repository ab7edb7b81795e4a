"""Real quantized layers from libraries PEFT users meet, built small on the CPU (`new --init` takes these)."""

import torch
from torch import nn


def quanto_linear(bits: int = 8) -> nn.Module:
    """optimum-quanto's QLinear, frozen: its weight a WeightQBytesTensor (int8) or WeightQBitsTensor (int4)."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = nn.Sequential(nn.Linear(16, 8))
    quantize(model, weights=qint8 if bits == 8 else qint4)
    freeze(model)
    return model[0]


def hqq_linear(bits: int = 8) -> nn.Module:
    """hqq's HQQLinear on its pytorch backend: a uint8 `W_q` (4-bit values packed two a byte) and its metadata."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = BaseQuantizeConfig(nbits=bits, group_size=8)
    return HQQLinear(nn.Linear(16, 8), config, compute_dtype=torch.float32, device="cpu")


def bit_linear() -> nn.Module:
    """transformers' BitLinear (BitNet b1.58): ternary weights packed four a byte in a uint8 buffer, and a scale."""
    from transformers.integrations.bitnet import BitLinear, pack_weights

    layer = BitLinear(16, 8, bias=False, device="cpu", dtype=torch.float32)
    ternary = torch.randint(-1, 2, (8, 16), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    layer.weight.copy_(pack_weights(ternary))
    layer.weight_scale.fill_(8.0)  # the weights are divided by it: outputs of about unit size, as once trained
    return layer


def bnb_linear8() -> nn.Module:
    """bitsandbytes' Linear8bitLt (LLM.int8 without outliers) on the CPU: an Int8Params weight; its training-mode
    kernel gives other outputs than its eval one."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    layer.load_state_dict(nn.Linear(64, 64).state_dict())
    return layer.to("cpu")


def torchao_linear(kind: str = "int8") -> nn.Module:
    """A plain nn.Linear whose weight torchao replaced by a tensor subclass: int8 or int4 (Intx, unpacked) weight-only,
    float8 weight-only, and the CPU's dynamic-activation kinds (int8 weights, int4 in groups of 8) and asymmetric
    int4 in groups of 8."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    configs = {
        "int8": Int8WeightOnlyConfig,
        "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4),
        "float8": Float8WeightOnlyConfig,
        "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "int4_dynamic": lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(8)
        ),
        "int4_asymmetric": lambda: IntxWeightOnlyConfig(
            weight_dtype=torch.int4, mapping_type=MappingType.ASYMMETRIC, granularity=PerGroup(8)
        ),
    }
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_(model, configs[kind]())
    return model[0]


def bnb_linear4() -> nn.Module:
    """bitsandbytes' Linear4bit (nf4) on the CPU: a Params4bit weight of packed bytes and its quantization state."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(nn.Linear(64, 32).state_dict())
    return layer.to("cpu")


def compressed_linear(bits: int = 8, group_size: int | None = None) -> nn.Module:
    """compressed-tensors' frozen quantized nn.Linear: a float weight its wrapped forward fake-quantizes with an int
    scale per channel, or per `group_size` columns of a row (calibrated here as absmax / qmax), as a checkpoint in its
    format loads."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    model = nn.Sequential(nn.Linear(16, 8))
    strategy = {"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, **strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    config = QuantizationConfig(config_groups={"weights": scheme}, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config)
    layer = model[0]
    with torch.no_grad():
        blocks = layer.weight.reshape(layer.weight.shape[0], -1, group_size or layer.weight.shape[1])
        layer.weight_scale.copy_(blocks.abs().amax(dim=-1).reshape(layer.weight_scale.shape) / (2 ** (bits - 1) - 1))
    return layer


def auto_bit_linear(online: bool = True) -> nn.Module:
    """transformers' AutoBitLinear: a float weight its forward ternarizes on every call (online) or ternary already
    with a scale (offline); its input is quantized to 8 bits per token either way."""
    from transformers.integrations.bitnet import AutoBitLinear

    return AutoBitLinear(16, 8, online_quant=online)


class _MixedBlock(nn.Module):
    """A float nn.Linear, then four quantized layers of four libraries side by side."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(16, 16)
        self.quanto = quanto_linear(8)
        self.compressed = compressed_linear(8)
        self.ao = torchao_linear("int8")
        self.bit = bit_linear()

    def forward(self, x):
        x = self.plain(x)
        return self.quanto(x) + self.compressed(x) + self.ao(x) + self.bit(x)


def mixed_model() -> nn.Module:
    """What `scan` must tell apart: plain nn.Linear and compressed-tensors' (same class), quanto's and torchao's
    (PEFT has a backend for torchao's only), BitNet's (its weight a buffer)."""
    torch.manual_seed(0)
    return nn.Sequential(_MixedBlock(), nn.Linear(8, 4))
