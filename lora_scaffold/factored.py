"""`delta` at factored cost: the base module's own forward runs with its weight as it is, and each product with that
weight or its transpose (`F.linear(x, W)`, `x @ W.T`, `W @ x`) gets LoRA's low-rank path added (`x A^T B^T * s` per
adapter) instead of reading `W + dW`. Any other use of the weight (a slice, a convolution, a norm) reads `W + dW`,
built once per call, so the output stays exact whatever the forward does. The generated layer carries
`FactoredWeightUses` as written here (its source), and `factored_proof` is what analysis runs before a layer takes
that path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from lora_scaffold.errors import USER_CODE_ERRORS


class FactoredWeightUses(TorchFunctionMode):
    """Active for one call of the base module. `weight` is the tensor the module reads; `terms` are (A with
    lora_dropout applied, B, scaling) per active adapter; `effective()` builds W + dW. Each F.linear or matmul of the
    weight, or of its transpose, gets the low-rank path added; any other use of either reads it plus its change."""

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
    TRANSPOSES = frozenset([torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__])
    MATMULS = frozenset([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])  # `@` arrives as Tensor.matmul

    def __init__(self, weight: torch.Tensor, terms: list, effective) -> None:
        super().__init__()
        self.weight, self.effective = weight, effective
        # Each tensor tracked (the weight, its transposes): by id, itself and the pairs (L, R) whose products sum to
        # its change, kept alive so that no id is reused while the mode is on.
        self.tracked = {
            id(weight): (weight, [(weight_B * scaling, weight_A) for weight_A, weight_B, scaling in terms])
        }
        self.factored = self.materialised = 0  # the uses of each kind seen (what the proof reports)
        self.built = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.METADATA or not _holds((args, kwargs), self._is_tracked):
            return func(*args, **kwargs)
        first = args[0] if args else None
        if (func in self.TRANSPOSES or _swaps_two_dimensions(func, args)) and self._is_tracked(first):
            result = func(*args, **kwargs)
            self.tracked[id(result)] = (result, [(right.mT, left.mT) for left, right in self._pairs(first)])
            return result
        if func is F.linear and len(args) > 1 and self._factors_only(args[1], args[:1] + args[2:], kwargs):
            self.factored += 1
            return self._plus(func(*args, **kwargs), args[0], args[1], lambda x, L, R: F.linear(F.linear(x, R), L))
        if func in self.MATMULS and len(args) == 2 and not kwargs:
            if self._factors_only(args[1], args[:1], {}):
                self.factored += 1
                return self._plus(func(*args), args[0], args[1], lambda x, L, R: (x @ L) @ R)
            if self._factors_only(args[0], args[1:], {}):
                self.factored += 1
                return self._plus(func(*args), args[1], args[0], lambda x, L, R: L @ (R @ x))
        self.materialised += 1
        return func(*_swapped(args, self._built), **_swapped(kwargs, self._built))

    def _is_tracked(self, value) -> bool:
        return isinstance(value, torch.Tensor) and self.tracked.get(id(value), (None,))[0] is value

    def _pairs(self, tensor: torch.Tensor) -> list:
        return self.tracked[id(tensor)][1]

    def _factors_only(self, tensor, others: tuple, kwargs: dict) -> bool:
        """A tracked matrix used once, with no other tracked tensor beside it."""
        return self._is_tracked(tensor) and tensor.dim() == 2 and not _holds((others, kwargs), self._is_tracked)

    def _plus(self, output: torch.Tensor, x: torch.Tensor, tensor: torch.Tensor, low_rank) -> torch.Tensor:
        for left, right in self._pairs(tensor):
            output = output + low_rank(x.to(right.dtype), left, right).to(output.dtype)
        return output

    def _built(self, value):
        """A tracked tensor as the forward would have it with W + dW (W + dW itself built once)."""
        if not self._is_tracked(value):
            return value
        if value is self.weight:
            if self.built is None:
                self.built = self.effective()
            return self.built
        return value + sum(left @ right for left, right in self._pairs(value)).to(value.dtype)


def _holds(value, found) -> bool:
    """Whether `found(item)` holds for an item of the arguments (in tuples, lists and dicts of them)."""
    if isinstance(value, (tuple, list)):
        return any(_holds(item, found) for item in value)
    if isinstance(value, dict):
        return any(_holds(item, found) for item in value.values())
    return found(value)


def _swapped(value, replace):
    """The arguments with each item replaced by `replace(item)` (in tuples, lists and dicts of them)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_swapped(item, replace) for item in value)
    if isinstance(value, dict):
        return {key: _swapped(item, replace) for key, item in value.items()}
    return replace(value)


def _swaps_two_dimensions(func, args: tuple) -> bool:
    """`transpose(0, 1)` (or -1, -2) of a matrix: its transpose."""
    if func not in (torch.Tensor.transpose, torch.transpose) or len(args) != 3:
        return False
    tensor, first, second = args
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and {first % 2, second % 2} == {0, 1}


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
        return False, "its weight is not a matrix"
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
            return False, "its forward multiplies no input by the weight (F.linear, matmul)"
        worst = max(worst, _relative_error(materialised, factored, weight_A, weight_B))
    if worst > PROOF_TOLERANCE:
        return False, f"not proven: the factored path is off by {worst:.0e}"
    products = "its product" if uses == 1 else f"each of its {uses} products"
    return True, (
        f"it runs with W as it is and adds the low-rank term to {products} (F.linear or matmul, of W or its "
        f"transpose; equal to W + dW within {worst:.0e})"
    )


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
    """What a generated layer module carries: the mode and its helpers."""
    import inspect

    helpers = (FactoredWeightUses, _holds, _swapped, _swaps_two_dimensions)
    return "\n\n\n".join(inspect.getsource(item).rstrip("\n") for item in helpers)
