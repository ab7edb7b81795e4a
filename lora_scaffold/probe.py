"""The numerical probe: does a factored LoRA path add exactly what a change of the weight adds?

For a random D, `f(x; W + D) - f(x; W)` is measured through `torch.func.functional_call` and compared with what the
factored path would add for the same D. Run in float64 so that a match is unambiguous.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lora_scaffold.sample_input import flatten_output


RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE_CLASSES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ProbeOutcome:
    strategy: str
    matched: bool
    relative_error: float
    note: str = ""


class Probe:
    """A float64 copy of the module with the chosen weight and inputs; everything the strategies are tested on."""

    def __init__(self, module: nn.Module, weight_name: str, inputs: tuple):
        self.module, self.inputs = _high_precision(module, inputs)
        self.module.eval()
        self.weight_name = weight_name
        self.weight = self.module.get_parameter(weight_name).detach()
        generator = torch.Generator().manual_seed(1)
        scale = float(self.weight.std()) if self.weight.numel() > 1 and float(self.weight.std()) > 0 else 1.0
        self.delta = torch.randn(self.weight.shape, generator=generator, dtype=self.weight.dtype) * scale
        self.output = flatten_output(self._run(self.weight))
        self.effect = self._effect()

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _run(self, weight: torch.Tensor):
        with torch.no_grad():
            return functional_call(self.module, {self.weight_name: weight}, self.inputs)

    def _effect(self) -> list[torch.Tensor]:
        after = flatten_output(self._run(self.weight + self.delta))
        return [a - b for a, b in zip(after, self.output) if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def weight_matters(self) -> bool:
        return any(bool((e != 0).any()) for e in self.effect)

    def compare(self, strategy: str, predicted: torch.Tensor | None, note: str = "") -> ProbeOutcome:
        """Does the change of the output equal `predicted`?"""
        return self.matches(strategy, self.effect, predicted, note)

    def matches(self, strategy: str, observed: list, predicted: torch.Tensor | None, note: str = "") -> ProbeOutcome:
        """Is `observed` (a flattened output) one tensor equal to `predicted`?"""
        if predicted is None or len(observed) != 1 or observed[0].shape != predicted.shape:
            reason = note or "output is not one tensor of the predicted shape"
            return ProbeOutcome(strategy, False, float("inf"), reason)
        observed = observed[0]
        scale = max(float(predicted.abs().max()), 1e-12)
        error = float((observed - predicted).abs().max()) / scale
        return ProbeOutcome(strategy, error <= RELATIVE_TOLERANCE[self.dtype], error, note)


def _high_precision(module: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    copied = copy.deepcopy(module)
    try:
        doubled = copied.double()
        cast = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        with torch.no_grad():
            doubled(*cast)
        return doubled, cast
    except Exception:
        return copy.deepcopy(module).float(), inputs


def probe_weight(module: nn.Module, weight_name: str, inputs: tuple) -> Probe:
    return Probe(module, weight_name, inputs)


def probe_linear(probe: Probe, fan_in_fan_out: bool) -> ProbeOutcome:
    x, weight, delta = probe.inputs[0], probe.weight, probe.delta
    strategy = "linear (weight stored [in, out])" if fan_in_fan_out else "linear"
    in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    if weight.dim() != 2 or not _is_float(x) or x.shape[-1] != in_features:
        return ProbeOutcome(strategy, False, float("inf"), "input's last dimension is not the weight's input size")
    predicted = x @ delta if fan_in_fan_out else F.linear(x, delta)
    return probe.compare(strategy, predicted)


def probe_embedding(probe: Probe, padding_idx: int | None) -> ProbeOutcome:
    x, delta = probe.inputs[0], probe.delta
    if delta.dim() != 2 or not isinstance(x, torch.Tensor) or x.is_floating_point():
        return ProbeOutcome("embedding", False, float("inf"), "input is not integer indices into a 2-D weight")
    return probe.compare("embedding", F.embedding(x, delta, padding_idx=padding_idx))


@dataclass(frozen=True)
class _ConvKind:
    strategy: str
    classes: dict
    geometry: tuple[str, ...]
    layout: str


CONV = _ConvKind("conv", CONV_CLASSES, ("stride", "padding", "dilation", "groups"), "[out, in/groups, *kernel]")
CONV_TRANSPOSE = _ConvKind(
    "conv_transpose",
    CONV_TRANSPOSE_CLASSES,
    ("stride", "padding", "output_padding", "dilation", "groups"),
    "[in, out/groups, *kernel]",
)


def probe_conv(probe: Probe, attributes: dict, kind: _ConvKind = CONV) -> ProbeOutcome:
    """Compare with a torch conv (or transposed conv) of the module's geometry whose weight is D."""
    x, delta = probe.inputs[0], probe.delta
    spatial = delta.dim() - 2
    missing = [name for name in kind.geometry if name not in attributes]
    if spatial not in kind.classes or missing or not _is_float(x):
        return ProbeOutcome(kind.strategy, False, float("inf"), f"no geometry ({', '.join(missing) or 'weight rank'})")
    groups = attributes["groups"]
    if kind is CONV:
        channels = (delta.shape[1] * groups, delta.shape[0])
        extra = {"padding_mode": attributes.get("padding_mode", "zeros")}
    else:
        channels = (delta.shape[0], delta.shape[1] * groups)
        extra = {"output_padding": attributes["output_padding"]}
    geometry = {name: attributes[name] for name in ("stride", "padding", "dilation", "groups")}
    try:
        conv = kind.classes[spatial](
            *channels, tuple(delta.shape[2:]), bias=False, dtype=delta.dtype, **geometry, **extra
        )
        with torch.no_grad():
            conv.weight.copy_(delta)
            predicted = conv(x)
    except Exception:
        return ProbeOutcome(kind.strategy, False, float("inf"), f"the weight is not laid out {kind.layout}")
    return probe.compare(kind.strategy, predicted)


def probe_affine(probe: Probe, strategy: str, fan_in_fan_out: bool, attributes: dict) -> ProbeOutcome:
    """Is the output exactly `F.linear(x, W, bias)` (or the conv's), the base result PEFT's DoRA layers assume?

    DoRA rescales `output - bias` and recomputes it from `x` and the weight when dropout is active; both are only
    right when the module computes nothing besides the weight's map and its bias."""
    x, weight = probe.inputs[0], probe.weight
    bias = getattr(probe.module, "bias", None)
    if not _is_float(x) or not (bias is None or isinstance(bias, torch.Tensor)):
        return ProbeOutcome(strategy, False, float("inf"), "no floating input, or a bias that is not a tensor")
    try:
        with torch.no_grad():
            observed = probe.output
            if bias is not None:
                # A bias of zeros (a common init) would not show whether the forward adds it at all.
                bias = torch.randn(bias.shape, generator=torch.Generator().manual_seed(2), dtype=bias.dtype)
                observed = flatten_output(functional_call(probe.module, {"bias": bias}, probe.inputs))
            if strategy == "linear":
                predicted = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
            else:
                geometry = [attributes[name] for name in ("stride", "padding", "dilation", "groups")]
                predicted = CONV_FUNCTIONS[weight.dim() - 2](x, weight, bias, *geometry)
    except Exception as exc:
        return ProbeOutcome(strategy, False, float("inf"), f"{type(exc).__name__}: {exc}")
    return probe.matches(strategy, observed, predicted)


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
