"""`delta` at factored cost: the base module's own forward runs with its weight as it is, and each `F.linear` of that
weight gets LoRA's low-rank path added (`x A^T B^T * s` per adapter) instead of reading `W + dW`. Any other use of the
weight (a transpose, a slice, a convolution, a norm) reads `W + dW`, built once per call, so the output stays exact
whatever the forward does. The generated layer carries `FactoredWeightUses` as written here (its source), and
`factored_proof` is what analysis runs before a layer takes that path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from lora_scaffold.errors import USER_CODE_ERRORS


class FactoredWeightUses(TorchFunctionMode):
    """Active for one call of the base module. `weight` is the tensor the module reads; `terms` are (A with
    lora_dropout applied, B, scaling) per active adapter; `effective()` builds W + dW for any other use."""

    # What reading the weight's metadata asks: the same for W and W + dW, so nothing is built for it.
    METADATA = frozenset(
        [
            *(getattr(torch.Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "requires_grad")),
            *(getattr(torch.Tensor, name).__get__ for name in ("layout", "is_cuda", "is_meta", "is_sparse")),
            torch.Tensor.size,
            torch.Tensor.dim,
            torch.Tensor.numel,
            torch.Tensor.is_floating_point,
            torch.Tensor.stride,
            torch.Tensor.is_contiguous,
        ]
    )

    def __init__(self, weight: torch.Tensor, terms: list, effective) -> None:
        super().__init__()
        self.weight, self.terms, self.effective = weight, terms, effective
        self.built = None
        self.factored = self.materialised = 0  # the uses of each kind seen (what the proof reports)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.factored += 1
            output = func(*args, **kwargs)
            for weight_A, weight_B, scaling in self.terms:
                low_rank = F.linear(F.linear(args[0].to(weight_A.dtype), weight_A), weight_B)
                output = output + (low_rank * scaling).to(output.dtype)
            return output
        if func in self.METADATA or not _holds((args, kwargs), self.weight):
            return func(*args, **kwargs)
        self.materialised += 1
        if self.built is None:
            self.built = self.effective()
        return func(*_swapped(args, self.weight, self.built), **_swapped(kwargs, self.weight, self.built))


def _holds(value, tensor: torch.Tensor) -> bool:
    """Whether `tensor` itself is in the arguments (in tuples, lists and dicts of them)."""
    if value is tensor:
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds(item, tensor) for item in value)
    if isinstance(value, dict):
        return any(_holds(item, tensor) for item in value.values())
    return False


def _swapped(value, tensor: torch.Tensor, other: torch.Tensor):
    """The arguments with `other` wherever `tensor` itself was."""
    if value is tensor:
        return other
    if isinstance(value, (tuple, list)):
        return type(value)(_swapped(item, tensor, other) for item in value)
    if isinstance(value, dict):
        return {key: _swapped(item, tensor, other) for key, item in value.items()}
    return value


# The proof: float64, random factors, several inputs; outputs and the factors' gradients must agree to this.
PROOF_TOLERANCE = 1e-9
PROOF_SEEDS = (0, 1, 2)
PROOF_RANK = 2


def factored_proof(module: nn.Module, weight_name: str, call) -> tuple[bool, str]:
    """(whether the factored path equals `W + dW` on the target, what the proof found), in float64 on a copy, for
    each of the probe's inputs (`call(seed)`) with random factors: the outputs, and the gradients of A and B."""
    import copy

    try:
        copied = copy.deepcopy(module).double()
        weight = copied.get_parameter(weight_name)
    except (*USER_CODE_ERRORS, AttributeError) as exc:
        return False, f"not proven: {type(exc).__name__}"
    if weight.dim() != 2:
        return False, "its weight is not a matrix, which F.linear alone takes"
    worst, uses = 0.0, 0
    for seed in PROOF_SEEDS:
        generator = torch.Generator().manual_seed(seed)
        scale = float(weight.detach().abs().mean()) or 1.0
        shape_A, shape_B = (PROOF_RANK, weight.shape[1]), (weight.shape[0], PROOF_RANK)
        weight_A = (torch.randn(shape_A, generator=generator, dtype=torch.float64) * scale).requires_grad_()
        weight_B = (torch.randn(shape_B, generator=generator, dtype=torch.float64)).requires_grad_()
        args, kwargs = call(seed)
        args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        try:
            materialised = _outputs(functional_call(copied, {weight_name: weight + weight_B @ weight_A}, args, kwargs))
            mode = FactoredWeightUses(weight, [(weight_A, weight_B, 1.0)], lambda: weight + weight_B @ weight_A)
            with mode:
                factored = _outputs(copied(*args, **kwargs))
        except USER_CODE_ERRORS as exc:
            return False, f"not proven: the forward failed under it ({type(exc).__name__})"
        uses = max(uses, mode.factored)
        if mode.factored == 0:
            return False, "its forward applies no F.linear to the weight"
        worst = max(worst, _relative_error(materialised, factored, weight_A, weight_B))
    if worst > PROOF_TOLERANCE:
        return False, f"not proven: the factored path is off by {worst:.0e}"
    uses_text = "the F.linear of it" if uses == 1 else f"each of the {uses} F.linear of it"
    return True, f"it runs with W as it is and adds x A^T B^T to {uses_text} (equal to W + dW within {worst:.0e})"


def _outputs(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [tensor for item in items for tensor in _outputs(item)]


def _relative_error(materialised: list, factored: list, *factors: torch.Tensor) -> float:
    """The largest difference of outputs and of the factors' gradients (of a random readout), relative to scale."""
    generator = torch.Generator().manual_seed(0)
    readouts = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in materialised]
    errors = []
    for outputs in (materialised, factored):
        total = sum((t * r).sum() for t, r in zip(outputs, readouts))
        errors.append(torch.autograd.grad(total, factors, allow_unused=True, retain_graph=True))
    pairs = list(zip(materialised, factored)) + [(a, b) for a, b in zip(*errors) if a is not None and b is not None]
    if any((a is None) != (b is None) for a, b in zip(*errors)):
        return float("inf")
    return max(
        (
            float((a - b).detach().abs().max()) / max(float(a.detach().abs().max()), 1e-30)
            for a, b in pairs
            if a.numel()
        ),
        default=0.0,
    )


def layer_source() -> str:
    """What a generated layer module carries: the mode and its two helpers."""
    import inspect

    return "\n\n\n".join(inspect.getsource(item).rstrip("\n") for item in (FactoredWeightUses, _holds, _swapped))
