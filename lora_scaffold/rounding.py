"""A float weight its forward reads through a rounding (compressed-tensors' frozen layers fake-quantize `weight` with
`weight_scale` on every call, BitNet's online AutoBitLinear ternarizes it): stored quantized in all but dtype.

Where the weight is used as it is, or transformed smoothly first (weight standardisation), or piecewise linearly
(a relu after it), a small move of it changes the output as the gradient says it will. Through a rounding it does
not: the output does not answer the move at all, or jumps by a whole step, while the gradient is zero or the
straight-through estimate of the unrounded use. Measured in float64 on a copy; a forward that is not deterministic,
or barely depends on the weight, is left to the probe to explain."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS


# Relative to the weight's spread: SMALL crosses few rounding steps even at 8 bits, LARGE crosses many.
SMALL = 1e-3
LARGE = 0.1
# How far the finite difference may be from the gradient's prediction (kinks crossed, second-order terms).
MISMATCH = 0.5
# Below this relative change under a LARGE move, the weight barely matters: the probe says so, in its words.
NEGLIGIBLE = 1e-6
SEED = 0


def rounding(module: nn.Module, weight_name: str, call) -> str:
    """How the forward rounds the weight ("rounded by its forward", naming the scale beside the weight where there
    is one), or "" when it does not or the measure cannot be taken."""
    try:
        copied = copy.deepcopy(module).double().eval()
        weight = copied.get_parameter(weight_name)
        if not weight.is_floating_point() or weight.numel() < 2:
            return ""
        args, kwargs = call(SEED)
        args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        rounded = _rounds(lambda: copied(*args, **kwargs), weight)
    except USER_CODE_ERRORS:
        return ""
    if not rounded:
        return ""
    owner_name, _, leaf = weight_name.rpartition(".")
    scale = f"{leaf}_scale"
    beside = isinstance(getattr(module.get_submodule(owner_name), scale, None), torch.Tensor)
    return f"rounded by its forward with {scale}" if beside else "rounded by its forward"


def _rounds(forward, weight: nn.Parameter) -> bool:
    generator = torch.Generator().manual_seed(SEED)
    direction = torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * weight.detach().std()
    output = forward()
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return False
    with torch.no_grad():
        if not torch.equal(forward(), output):
            return False  # not deterministic: the probe says so
        big = _moved(forward, weight, LARGE * direction) - output
        if not float(big.abs().max()) > NEGLIGIBLE * float(output.abs().max()):
            return False  # the weight barely moves the output: the probe says so
        readout = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        up, down = (float((_moved(forward, weight, s * SMALL * direction) * readout).sum()) for s in (1, -1))
    finite_difference = (up - down) / (2 * SMALL)
    (gradient,) = torch.autograd.grad((output * readout).sum(), weight, allow_unused=True)
    predicted = 0.0 if gradient is None else float((gradient * direction).sum())
    scale = max(abs(finite_difference), abs(predicted))
    return scale == 0 or abs(finite_difference - predicted) > MISMATCH * scale


def _moved(forward, weight: nn.Parameter, move: torch.Tensor) -> torch.Tensor:
    """The output with the weight moved by `move` (put back after)."""
    with torch.no_grad():
        original = weight.detach().clone()
        try:
            weight.copy_(original + move)
            return forward()
        finally:
            weight.copy_(original)
