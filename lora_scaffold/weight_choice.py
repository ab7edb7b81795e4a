"""Which weight of the target LoRA adapts: the one asked for, else the only one of two or more dimensions (or the
one named `weight`); a weight a parametrization computes only where that parametrization takes a merged weight back."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, AnalysisError
from lora_scaffold.introspect import TargetSpec, TensorInfo


def choose_weight(spec: TargetSpec, requested: str | None) -> TensorInfo:
    quantized = [t for t in (*spec.parameters, *spec.buffers) if t.quantized]
    if not spec.parameters and not quantized:
        what = "only buffers" if spec.buffers else "no parameters"
        raise AnalysisError(f"{spec.target.class_name} has {what}: there is no trainable weight for LoRA to adapt")
    if requested is not None:
        return _requested(spec, requested, quantized)
    # A per-channel scale such as `gain [C, 1, 1]` is not a weight LoRA would adapt: two real dimensions needed.
    # The pieces a parametrization computes a weight from (weight_norm's original0/1) stand behind that weight.
    candidates = [
        p
        for p in spec.parameters
        if sum(size > 1 for size in p.shape) >= 2 and "parametrizations" not in p.name.split(".") and not p.quantized
    ] or quantized
    named_weight = [p for p in candidates if p.name == "weight"]
    if len(candidates) == 1 or len(named_weight) == 1:
        return (named_weight or candidates)[0]
    if not candidates:
        names = ", ".join(f"{p.name} {list(p.shape)}" for p in spec.parameters)
        raise AnalysisError(
            f"{spec.target.class_name} has no weight with 2 or more dimensions ({names}); pick one with --weight"
        )
    names = ", ".join(f"{p.name} {list(p.shape)}" for p in candidates)
    raise AnalysisError(f"{spec.target.class_name} has several weights ({names}); pick one with --weight NAME")


def _requested(spec: TargetSpec, requested: str, quantized: list[TensorInfo]) -> TensorInfo:
    found = next((t for t in quantized if t.name == requested), None) or spec.parameter(requested)
    if found is None:
        names = ", ".join(p.name for p in (*spec.parameters, *quantized))
        raise AnalysisError(f"{spec.target.class_name} has no parameter {requested!r}; its parameters: {names}")
    if not found.shape or 0 in found.shape:
        raise AnalysisError(
            f"{spec.target.class_name}.{requested} has shape {list(found.shape)}: no low-rank adapter fits it"
        )
    return found


def require_invertible(spec: TargetSpec, built: nn.Module, name: str) -> None:
    """Merging assigns W + dW to a computed weight: its parametrization must give that back (right_inverse). Asked of
    a copy of the built target, which the probe needs as it was built."""
    module = copy.deepcopy(built)
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    weight = getattr(owner, attribute).detach()
    wanted = weight + 0.1 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            setattr(owner, attribute, wanted)
        error = float((getattr(owner, attribute).detach() - wanted).abs().max() / wanted.abs().max())
    except USER_CODE_ERRORS as exc:
        error, note = math.inf, f" ({type(exc).__name__}: {exc})"
    else:
        note = f" (off by {error:.1e}, relative)"
    if not error <= 1e-5:
        pieces = [
            p.name
            for p in spec.parameters
            if p.name.startswith(f"{owner_name}.parametrizations.{attribute}.".lstrip("."))
        ]
        raise AnalysisError(
            f"{spec.target.class_name}.{name} is computed by a parametrization that cannot take a merged weight "
            f"back{note}; adapt one of what it is computed from with --weight ({', '.join(pieces)})"
        )
