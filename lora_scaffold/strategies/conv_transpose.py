"""`conv_transpose`: a transposed convolution weight [in, out/groups, *kernel], output_padding included."""

from __future__ import annotations

from torch import nn

from lora_scaffold.strategies.conv import Conv


class ConvTranspose(Conv):
    name = "conv_transpose"
    family = "conv"
    help = "transposed convolution weight [in, out/groups, *k] (--strategy conv): lora_A a transposed conv"
    summary = "The adapter adds `lora_B(lora_A(dropout(x))) * scaling`, lora_A a transposed conv like the base layer."
    partial = "partials/conv_transpose.jinja"
    no_dora = "PEFT has no DoRA for transposed convolutions"
    torch_classes = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
    geometry = ("stride", "padding", "output_padding", "dilation", "groups")
    layout = "[in, out/groups, *kernel]"

    def _conv_like_base(self, delta, attributes: dict) -> nn.Module:
        geometry = {name: attributes[name] for name in self.geometry}
        channels = (delta.shape[0], delta.shape[1] * attributes["groups"])
        conv_class = self.torch_classes[delta.dim() - 2]
        return conv_class(*channels, tuple(delta.shape[2:]), bias=False, dtype=delta.dtype, **geometry)

    def dora_blocker(self, evidence, verdict) -> str:
        return self.no_dora

    def bias_size(self, weight_shape, fan_in_fan_out, groups):
        return weight_shape[1] * groups

    def dora_variant(self, weight_shape):
        return ""


CONV_TRANSPOSE = ConvTranspose()
