"""`conv`: an N-d convolution weight [out, in/groups, *kernel] with stride, padding, dilation and groups."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from lora_scaffold.probe import NOT_ONE_TENSOR
from lora_scaffold.strategies.base import AffineStrategy, Evidence, Verdict


CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Conv(AffineStrategy):
    name = family = "conv"
    help = "N-d convolution weight [out, in/groups, *k]: lora_A convolves like the base layer, lora_B is 1x1"
    summary = "The adapter adds `lora_B(lora_A(dropout(x))) * scaling`, lora_A convolving like the base layer."
    partial = "partials/conv.jinja"
    torch_classes = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    geometry = ("stride", "padding", "dilation", "groups")
    layout = "[out, in/groups, *kernel]"

    def fits(self, evidence: Evidence) -> bool:
        return len(evidence.weight.shape) >= 3

    def groups(self, attributes: dict) -> int:
        return attributes.get("groups", 1)

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        """Compare with a torch conv of the module's geometry whose weight is D."""
        probe, attributes = evidence.probe, evidence.attributes
        missing = [name for name in self.geometry if name not in attributes]
        if probe.weight.dim() - 2 not in self.torch_classes or missing or not probe.floating_input:
            note = f"no geometry ({', '.join(missing) or 'weight rank'})"
            return (self.verdict(NOT_ONE_TENSOR, note, probe=probe),)

        def predict(trial):
            conv = self._conv_like_base(trial.delta, attributes)
            conv.weight.data.copy_(trial.delta)
            return conv(trial.x).detach()

        try:
            error = probe.error(predict)
        except Exception:
            return (self.verdict(NOT_ONE_TENSOR, f"the weight is not laid out {self.layout}", probe=probe),)
        return (self.verdict(error, probe=probe),)

    def _conv_like_base(self, delta, attributes: dict) -> nn.Module:
        geometry = {name: attributes[name] for name in ("stride", "padding", "dilation", "groups")}
        channels = (delta.shape[1] * attributes["groups"], delta.shape[0])
        padding_mode = attributes.get("padding_mode", "zeros")
        conv_class = self.torch_classes[delta.dim() - 2]
        return conv_class(
            *channels, tuple(delta.shape[2:]), bias=False, dtype=delta.dtype, padding_mode=padding_mode, **geometry
        )

    def base_output(self, evidence, verdict, x, weight, bias):
        geometry = [evidence.attributes[name] for name in ("stride", "padding", "dilation", "groups")]
        return CONV_FUNCTIONS[weight.dim() - 2](x, weight, bias, *geometry)

    def bias_size(self, weight_shape, fan_in_fan_out, groups):
        return weight_shape[0]

    def bias_change(self, evidence, change, output):
        return change.view(1, -1, *[1] * (output.dim() - 2)).expand_as(output)

    def test_rank(self, groups: int) -> int:
        return math.lcm(4, groups)

    def dora_variant(self, weight_shape):
        return f"DoraConv{len(weight_shape) - 2}dVariant"

    def template_answers(self, evidence):
        return {"conv_class": f"nn.{self.torch_classes[len(evidence.weight.shape) - 2].__name__}"}


CONV = Conv()
