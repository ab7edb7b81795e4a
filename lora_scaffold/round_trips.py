"""Writing W + dW back into a quantized base, for the libraries whose layers the library itself can quantize again
from a float weight: a function `(base, weight, bias) -> a new base` per library. The generated layer carries the
function's own source (its `merge` swaps in the new base, its `unmerge` swaps the untouched old one back), and
analysis runs the very same function to measure how much of a typical dW survives. Each function imports its
library itself: the generated module stays importable without it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A float nn.Linear holding `weight` [out, in] and `bias` (None: no bias)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(bias)
    return linear.to(weight.device)


def requantized_quanto(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """optimum-quanto's QLinear quantizing the float layer, with the base's weight and activation types, frozen."""
    from optimum.quanto.nn import QLinear

    float_layer = _float_linear(weight, bias)
    layer = QLinear.from_module(
        float_layer, weights=base.weight_qtype, activations=base.activation_qtype, optimizer=base.optimizer
    )
    layer.freeze()
    return layer


def requantized_hqq(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """hqq's HQQLinear quantizing the float layer with the base's configuration (as PEFT's HqqLoraLinear merges)."""
    import copy

    from hqq.core.quantize import HQQLinear

    config = {**copy.deepcopy(base.quant_config), "offload_meta": base.offload_meta}
    return HQQLinear(_float_linear(weight, bias), config, compute_dtype=base.compute_dtype, device=base.device)


def requantized_bnb_int8(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """bitsandbytes' Linear8bitLt loaded from the float layer, with the base's outlier threshold."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        has_fp16_weights=False,
        threshold=base.state.threshold,
    )
    layer.load_state_dict(_float_linear(weight, bias).state_dict())
    return layer.to(base.weight.device)


def requantized_bnb_4bit(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """bitsandbytes' Linear4bit loaded from the float layer, with the base's quantization type and statistics."""
    import bitsandbytes as bnb

    stored = base.weight
    layer = bnb.nn.Linear4bit(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        compute_dtype=base.compute_dtype,
        compress_statistics=stored.compress_statistics,
        quant_type=stored.quant_type,
        quant_storage=stored.quant_storage,
    )
    layer.load_state_dict(_float_linear(weight, bias).state_dict())
    return layer.to(stored.device)


def requantized_torchao(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The float layer with its weight quantized by torchao into the base weight's tensor class, dtype and blocks
    (int8 and float8 per row or per tensor, intx per block), with the base's mapping (asymmetric where it has zero
    points) and activation quantization (the dynamic-activation kinds), so that the merged layer computes as the
    base does."""
    from torchao.quantization import Float8Tensor, Int8Tensor, IntxUnpackedToInt8Tensor
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    stored = base.weight
    layer = _float_linear(weight, bias)
    granularity = PerRow() if list(stored.block_size) == [1, weight.shape[1]] else PerTensor()
    zero_point = getattr(stored, "zero_point", None)
    asymmetric = zero_point is not None and bool((zero_point != 0).any())
    mapping = MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC
    if isinstance(stored, IntxUnpackedToInt8Tensor):
        quantized = IntxUnpackedToInt8Tensor.from_hp(
            weight,
            tuple(stored.block_size),
            stored.target_dtype,
            mapping_type=mapping,
            activation_quantization=stored.activation_quantization,
        )
    elif isinstance(stored, Int8Tensor):
        quantized = Int8Tensor.from_hp(
            weight,
            granularity,
            mapping_type=mapping,
            act_quant_kwargs=stored.act_quant_kwargs,
            reduce_range=stored.reduce_range,
        )
    elif isinstance(stored, Float8Tensor):
        quantized = Float8Tensor.from_hp(
            weight,
            float8_dtype=stored.qdata.dtype,
            granularity=granularity,
            mm_config=stored.mm_config,
            kernel_preference=stored.kernel_preference,
            act_quant_kwargs=stored.act_quant_kwargs,
        )
    else:
        raise TypeError(f"no torchao round trip for {type(stored).__name__}")
    layer.weight = nn.Parameter(quantized, requires_grad=False)
    return layer


def requantized_compressed_tensors(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of the frozen layer holding `weight`, with its scale and zero point computed again by compressed-tensors
    (`calculate_qparams`) for the base's own quantization arguments (per channel, per tensor or per group of
    columns)."""
    import copy

    from compressed_tensors.quantization.utils import calculate_qparams

    arguments = base.quantization_scheme.weights
    strategy = str(getattr(arguments.strategy, "value", arguments.strategy))
    if strategy not in ("channel", "tensor", "group"):
        raise TypeError(f"no compressed-tensors round trip for the {strategy} strategy")
    # What each scale covers: a row, the whole weight, or `group_size` columns of a row.
    blocks = {
        "channel": weight.reshape(weight.shape[0], 1, -1),
        "tensor": weight.reshape(1, 1, -1),
        "group": weight.reshape(weight.shape[0], -1, arguments.group_size or weight.shape[1]),
    }[strategy]
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scale, zero_point = calculate_qparams(torch.clamp(low, max=0), torch.clamp(high, min=0), arguments)
    layer = copy.deepcopy(base)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.weight_scale.copy_(scale.reshape(layer.weight_scale.shape))
        layer.weight_zero_point.copy_(zero_point.reshape(layer.weight_zero_point.shape))
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
        elif bias is not None:
            layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer


def requantized_bitnet(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of BitNet's BitLinear holding `weight` ternarized on the base's own grid (`weight * weight_scale`
    rounded to -1, 0 or 1, which gives the base's codes back for its own weight), packed by transformers'
    `pack_weights`."""
    import copy

    from transformers.integrations.bitnet import pack_weights

    ternary = (weight * base.weight_scale.to(weight.dtype)).round().clamp(-1, 1).to(torch.int8)
    layer = copy.deepcopy(base)
    with torch.no_grad():
        layer.weight.copy_(pack_weights(ternary))
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
        elif bias is not None:
            raise TypeError("this BitLinear has no bias for lora_bias to merge into")
    return layer


@dataclass(frozen=True)
class RoundTrip:
    library: str
    package: str  # the top-level package the class comes from
    class_name: str  # the class, or a base class of it
    requantized: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], nn.Module]
    classes: tuple[str, ...] = ()  # for a round trip on the weight: the tensor classes it knows
    on_weight: bool = False  # the class is the weight's (torchao's tensor subclasses on a plain nn.Linear)
    attribute: str = ""  # the class is that of this attribute of the module (compressed-tensors' quantization_scheme)

    def matches(self, module: nn.Module) -> bool:
        owner = getattr(module, self.attribute or "weight", None) if self.on_weight or self.attribute else module
        return (
            owner is not None
            and any(
                c.__name__ == self.class_name and c.__module__.split(".")[0] == self.package
                for c in type(owner).__mro__
            )
            and (not self.classes or type(owner).__name__ in self.classes)
        )

    def source(self) -> str:
        """The code the generated layer carries: the float-layer helper and the function."""
        return f"{inspect.getsource(_float_linear)}\n\n{inspect.getsource(self.requantized)}".rstrip("\n")


ROUND_TRIPS = (
    RoundTrip("optimum-quanto", "optimum", "QLinear", requantized_quanto),
    RoundTrip("hqq", "hqq", "HQQLinear", requantized_hqq),
    RoundTrip("bitsandbytes", "bitsandbytes", "Linear8bitLt", requantized_bnb_int8),
    RoundTrip("bitsandbytes", "bitsandbytes", "Linear4bit", requantized_bnb_4bit),
    RoundTrip("transformers", "transformers", "BitLinear", requantized_bitnet),
    RoundTrip(
        "compressed-tensors",
        "compressed_tensors",
        "QuantizationScheme",
        requantized_compressed_tensors,
        on_weight=False,
        attribute="quantization_scheme",
    ),
    RoundTrip(
        "torchao",
        "torchao",
        "TorchAOBaseTensor",
        requantized_torchao,
        ("Int8Tensor", "IntxUnpackedToInt8Tensor", "Float8Tensor"),
        on_weight=True,
    ),
)


def round_trip_for(module: nn.Module) -> RoundTrip | None:
    return next((trip for trip in ROUND_TRIPS if trip.matches(module)), None)


def named(function_name: str) -> RoundTrip:
    return next(trip for trip in ROUND_TRIPS if trip.requantized.__name__ == function_name)
