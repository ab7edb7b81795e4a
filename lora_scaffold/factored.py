"""`delta` and `experts` at factored cost: the base module's own forward runs with its weight as it is, and each
product of an input with that weight, its transpose or an expert's slice of it (`F.linear(x, W)`, `x @ W.T`,
`F.linear(x, W[e])`, `torch.bmm`, `grouped_mm`) gets LoRA's low-rank path added (`x L R` per adapter, the change of the
weight being `L @ R`) instead of reading `W + dW`. Any other use of the weight (a norm, a convolution, `W^T W`) reads
`W + dW`, built once per call, so the output stays exact whatever the forward does. The generated layer carries
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
    """Active for one call of the base module. `weight` is the tensor the module reads; `pairs` are (L, R) per active
    adapter, the change of the weight being the sum of `L @ R` (batched over experts for a bank of them, scaling and
    dropout already in them); `effective()` builds W + dW. Each product of an input with the weight, its transpose
    or an expert's slice gets the low-rank path added; any other use of any of them reads it plus its change."""

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
    MATRIX_TRANSPOSES = frozenset([torch.Tensor.t, torch.t, torch.Tensor.T.__get__])
    TRANSPOSES = frozenset([torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.swapaxes])
    VIEWS = frozenset([torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten])
    MATMULS = frozenset([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])  # `@` arrives as Tensor.matmul
    BATCHED = frozenset([torch.bmm, torch.Tensor.bmm])
    CONVOLUTIONS = frozenset([F.conv1d, F.conv2d, F.conv3d])
    # torch's grouped products, where this torch has them (transformers' grouped_mm experts call one)
    GROUPED = frozenset(filter(None, [getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)]))

    def __init__(self, weight: torch.Tensor, pairs: list, effective) -> None:
        super().__init__()
        self.weight, self.effective = weight, effective
        # Each tensor tracked (the weight, its transposes and slices): by id, itself and the pairs (L, R) whose
        # products sum to its change, kept alive so that no id is reused while the mode is on. The weight of a bank
        # flattened as [experts * d1, d2] has [experts, d1, d2] pairs: only its view as that shape is factored.
        self.tracked = {id(weight): (weight, list(pairs))}
        self.factored = self.materialised = 0  # the uses of each kind seen (what the proof reports)
        self.built = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.METADATA or not _holds((args, kwargs), self._is_tracked):
            return func(*args, **kwargs)
        first = args[0] if args else None
        if self._is_tracked(first) and not _holds((args[1:], kwargs), self._is_tracked):
            derive = self._derived_pairs(func, first, args[1:], kwargs)
            if derive is not None:
                result = func(*args, **kwargs)
                pairs = derive(result)
                if pairs is not None:
                    self.tracked[id(result)] = (result, pairs)
                    return result
                self.materialised += 1  # `result` is W as it is: the forward must see W + dW
                return func(*_swapped(args, self._built), **_swapped(kwargs, self._built))
        factored = self._factored(func, args, kwargs)
        if factored is not None:
            self.factored += 1
            return factored
        self.materialised += 1
        return func(*_swapped(args, self._built), **_swapped(kwargs, self._built))

    def _derived_pairs(self, func, tensor: torch.Tensor, others: tuple, kwargs: dict):
        """For a transpose, an expert's slice or a view of a tracked tensor: a function of the result giving its
        pairs (None when its change is not theirs); None for any other function."""
        pairs = self._pairs(tensor)
        if func in self.VIEWS or func is torch.Tensor.contiguous:
            # A view is factored where its shape is the pairs' own ([experts, d1, d2] of a flattened bank).
            return lambda result: pairs if tuple(result.shape) == _changed_shape(pairs) else None
        if not self._matches(tensor):
            return None
        if (
            func in self.MATRIX_TRANSPOSES
            and tensor.dim() == 2
            or func is torch.Tensor.mT.__get__
            or (func in self.TRANSPOSES and _last_two(tensor, *others[:2]))
        ):
            return lambda result: [(right.mT, left.mT) for left, right in pairs]
        if func is torch.Tensor.__getitem__ and len(others) == 1 and _indexes_leading(others[0], tensor.dim() - 2):
            return lambda result: [(left[others[0]], right[others[0]]) for left, right in pairs]
        if func in (torch.Tensor.select, torch.select, torch.Tensor.index_select, torch.index_select) and (
            len(others) == 2
            and not kwargs
            and isinstance(others[0], int)
            and others[0] % tensor.dim() < tensor.dim() - 2
        ):
            dim = others[0] % tensor.dim()
            return lambda result: [(func(left, dim, others[1]), func(right, dim, others[1])) for left, right in pairs]
        return None

    def _factored(self, func, args: tuple, kwargs: dict):
        """The base op plus the low-rank path, for a product of an input with a tracked tensor (else None)."""
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func in self.CONVOLUTIONS:
            return self._convolution(func, args, kwargs)
        if func is F.embedding:
            return self._embedding(func, args, kwargs)
        if func is F.bilinear:
            return self._bilinear(func, args, kwargs)
        if len(args) != 2:
            return None
        x_first, weight_first = (
            self._factors_only(args[1], args[:1], kwargs),
            self._factors_only(args[0], args[1:], kwargs),
        )
        if func in self.MATMULS and not kwargs and (x_first or weight_first):
            other, tensor = args if x_first else args[::-1]
            if tensor.dim() > 2 and other.dim() < 2:  # a vector would broadcast against the experts
                return None
            low_rank = (lambda x, L, R: (x @ L) @ R) if x_first else (lambda x, L, R: L @ (R @ x))
            return self._plus(func(*args), other, tensor, low_rank)
        if func in self.BATCHED and not kwargs and (x_first or weight_first):
            other, tensor = args if x_first else args[::-1]
            low_rank = (
                (lambda x, L, R: torch.bmm(torch.bmm(x, L), R))
                if x_first
                else (lambda x, L, R: torch.bmm(L, torch.bmm(R, x)))
            )
            return self._plus(func(*args), other, tensor, low_rank)
        unset = all(value is None for key, value in kwargs.items() if key != "offs")  # no bias, no out_dtype
        if func in self.GROUPED and x_first and unset and args[1].dim() == 3:
            offs = kwargs.get("offs")
            return self._plus(func(*args, **kwargs), args[0], args[1], lambda x, L, R: _grouped(func, x, L, R, offs))
        return None

    def _linear(self, func, args: tuple, kwargs: dict):
        """linear(x, W + dW) for a matrix W, passed by position or by keyword: linear(x, W) plus x R^T L^T."""
        bound = dict(zip(("input", "weight", "bias"), args)) | kwargs
        weight = bound.get("weight")
        if not self._factors_only(weight, (bound.get("input"), bound.get("bias")), {}, 2):
            return None
        return self._plus(func(*args, **kwargs), bound["input"], weight, lambda x, L, R: F.linear(F.linear(x, R), L))

    def _convolution(self, func, args: tuple, kwargs: dict):
        """conv(x, W + dW) for a kernel W [out, in, *k] whose change is [out, in * k...] (`delta`'s layout), ungrouped:
        conv(x, W), plus a 1x1 convolution by L of the convolution of x by R's r kernels."""
        bound = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args)) | kwargs
        weight, rest = bound.get("weight"), {k: v for k, v in bound.items() if k not in ("input", "weight", "bias")}
        if rest.get("groups", 1) != 1 or not self._flat_change_only(weight, (bound["input"], bound.get("bias"), rest)):
            return None
        ones = (1,) * (weight.dim() - 2)

        def low_rank(x, left, right):
            kernels = func(x, right.reshape(-1, *weight.shape[1:]), None, **rest)
            return func(kernels, left.reshape(*left.shape, *ones))

        return self._plus(func(*args, **kwargs), bound["input"], weight, low_rank)

    def _bilinear(self, func, args: tuple, kwargs: dict):
        """bilinear(x1, x2, W + dW) for W [out, in1, in2] whose change is [out, in1 * in2]: bilinear(x1, x2, W),
        plus the bilinear form of x1 and x2 with R's r matrices, times L^T."""
        bound = dict(zip(("input1", "input2", "weight", "bias"), args)) | kwargs
        weight, second = bound.get("weight"), bound["input2"]
        if not self._flat_change_only(weight, (bound["input1"], second, bound.get("bias"))):
            return None

        def low_rank(x, left, right):
            return func(x, second.to(right.dtype), right.reshape(-1, *weight.shape[1:])) @ left.T

        return self._plus(func(*args, **kwargs), bound["input1"], weight, low_rank)

    def _flat_change_only(self, weight, others) -> bool:
        """A tracked kernel of 3 or more dimensions whose pairs change it as [out, in * ...] (`delta`'s layout),
        with no other tracked tensor beside it."""
        return (
            self._is_tracked(weight)
            and weight.dim() >= 3
            and all(_changed_shape([pair]) == (weight.shape[0], weight[0].numel()) for pair in self._pairs(weight))
            and not _holds(others, self._is_tracked)
        )

    def _embedding(self, func, args: tuple, kwargs: dict):
        """embedding(ids, W + L R) = embedding(ids, W) + embedding(ids, L) @ R; the padding row's term gets no
        gradient, as that row of W + dW would not. Not where max_norm rewrites W in place, nor where the gradient of
        each row is scaled by its frequency (which would scale L's rows, not R)."""
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args)) | kwargs
        ids, weight = bound["input"], bound.get("weight")
        if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or bound.get("sparse"):
            return None
        if not self._factors_only(weight, (ids,), {k: v for k, v in bound.items() if k not in names[:2]}, 2):
            return None
        padding = bound.get("padding_idx")

        def low_rank(ids, left, right):
            term = func(ids, left) @ right
            if padding is None:
                return term
            return torch.where((ids == padding % weight.shape[0]).unsqueeze(-1), term.detach(), term)

        return self._plus(func(*args, **kwargs), ids, weight, low_rank)

    def _is_tracked(self, value) -> bool:
        return isinstance(value, torch.Tensor) and self.tracked.get(id(value), (None,))[0] is value

    def _pairs(self, tensor: torch.Tensor) -> list:
        return self.tracked[id(tensor)][1]

    def _matches(self, tensor: torch.Tensor) -> bool:
        """Whether the pairs' products are the tensor's change as laid out (not so for a flattened bank itself)."""
        return all(_changed_shape([pair]) == tuple(tensor.shape) for pair in self._pairs(tensor))

    def _factors_only(self, tensor, others: tuple, kwargs: dict, dims: int | None = None) -> bool:
        """A tracked tensor whose pairs are its change, used once, with no other tracked tensor beside it."""
        return (
            self._is_tracked(tensor)
            and (tensor.dim() == dims if dims else tensor.dim() >= 2)
            and self._matches(tensor)
            and not _holds((others, kwargs), self._is_tracked)
        )

    def _plus(self, output: torch.Tensor, x: torch.Tensor, tensor: torch.Tensor, low_rank) -> torch.Tensor:
        for left, right in self._pairs(tensor):
            x = x.to(right.dtype) if x.is_floating_point() else x  # an embedding's ids stay integers
            output = output + low_rank(x, left, right).to(output.dtype)
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


def _changed_shape(pairs: list) -> tuple[int, ...]:
    """The shape of the change the pairs' products make (batched over their leading dimensions)."""
    left, right = pairs[0]
    return (*torch.broadcast_shapes(left.shape[:-2], right.shape[:-2]), left.shape[-2], right.shape[-1])


def _last_two(tensor: torch.Tensor, *dims) -> bool:
    """`transpose(-2, -1)` (or its positive dims): the tensor's matrices transposed."""
    if len(dims) != 2 or not all(isinstance(dim, int) for dim in dims):
        return False
    return sorted(dim % tensor.dim() for dim in dims) == [tensor.dim() - 2, tensor.dim() - 1]


def _indexes_leading(index, leading: int) -> bool:
    """Whether `tensor[index]` picks among the leading `leading` dimensions only (experts), never in a matrix."""
    items = index if isinstance(index, tuple) else (index,)
    used = 0
    for item in items:
        if isinstance(item, torch.Tensor) and not item.is_floating_point() and item.dim() > 0:
            used += item.dim() if item.dtype == torch.bool else 1
        elif isinstance(item, torch.Tensor) and item.dtype != torch.bool and not item.is_floating_point():
            used += 1  # a 0-dim integer tensor, as a loop over `nonzero()` gives
        elif isinstance(item, (int, slice)) and not isinstance(item, bool):
            used += 1
        else:  # None, Ellipsis, a bool or a list: not a plain pick among experts
            return False
    return used <= leading


def _grouped(func, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, offs) -> torch.Tensor:
    """x's groups of rows through their expert's L then R, with the grouped product the forward used: it asks
    strides of 16 bytes, so the rank is padded with zeros (exact)."""
    pad = -left.shape[-1] % max(1, 16 // left.element_size())
    left = F.pad(left, (0, pad)).contiguous()
    right = F.pad(right, (0, 0, 0, pad)).mT.contiguous().mT  # column-major: its stride is the padded rank
    return func(func(x, left, offs=offs), right, offs=offs)


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


# The proof: random factors, several inputs; outputs and the factors' gradients must agree to this, in float64, or in
# float32 for a forward that does not run in float64 (torch's grouped_mm).
PROOF_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
PROOF_SEEDS = (0, 1, 2)


def test_tolerance(dtype_name: str) -> float:
    """What the generated test allows, relative to each tensor's scale, for a proof in that dtype (named as the
    plan names it): the proof's own in float32, where long sums in another order differ in their last bits; 0.0
    (assert_close's defaults) in float64, which also hold where old PEFT keeps float32 factors beside a float64
    base."""
    return PROOF_TOLERANCE[torch.float32] if dtype_name == "float32" else 0.0


PROOF_RANK = 2
LINEAR_USES = (
    "F.linear, matmul, bmm, grouped_mm, bilinear, an ungrouped conv, an embedding without max_norm or "
    "scale_grad_by_freq"
)


def factored_proof(
    module: nn.Module, weight_name: str, call, changed_shape: tuple[int, ...] | None = None, dtype=torch.float64
) -> tuple[bool, str]:
    """(whether the factored path equals `W + dW` on the target, what the proof found), in `dtype` on a copy, for
    each of the probe's inputs (`call(seed)`) with random factors: the outputs, and the gradients of A and B.
    `changed_shape` is how the layer lays out the change: [out, in * ...] (`delta`'s B @ A, reshaped to the
    weight's shape; the default) or [experts, d1, d2], one pair per expert."""
    import copy

    try:
        copied = copy.deepcopy(module).to(dtype)
        weight = copied.get_parameter(weight_name)
    except (*USER_CODE_ERRORS, AttributeError) as exc:
        return False, f"not proven: {type(exc).__name__}"
    changed_shape = tuple(changed_shape or (weight.shape[0], weight[0].numel()))
    worst, uses = 0.0, 0
    for seed in PROOF_SEEDS:
        generator = torch.Generator().manual_seed(seed)
        scale = float(weight.detach().abs().mean()) or 1.0
        *experts, rows, columns = changed_shape
        shape_A, shape_B = (*experts, PROOF_RANK, columns), (*experts, rows, PROOF_RANK)
        weight_A = (torch.randn(shape_A, generator=generator, dtype=dtype) * scale).requires_grad_()
        weight_B = (torch.randn(shape_B, generator=generator, dtype=dtype)).requires_grad_()
        args, kwargs = call(seed)
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

        def effective() -> torch.Tensor:
            return weight + (weight_B @ weight_A).reshape(weight.shape)

        try:
            materialised = _outputs(functional_call(copied, {weight_name: effective()}, args, kwargs))
            mode = FactoredWeightUses(weight, [(weight_B, weight_A)], effective)
            with mode:
                factored = _outputs(copied(*args, **kwargs))
        except USER_CODE_ERRORS as exc:
            return False, f"not proven: the forward failed under it ({type(exc).__name__})"
        uses = max(uses, mode.factored)
        if mode.factored == 0:
            return False, f"its forward uses the weight in no way the factored path takes ({LINEAR_USES})"
        worst = max(worst, _relative_error(materialised, factored, weight_A, weight_B))
    if worst > PROOF_TOLERANCE[dtype]:
        return False, f"not proven: the factored path is off by {worst:.0e}"
    products = "its product" if uses == 1 else f"each of its {uses} products"
    precision = "" if dtype == torch.float64 else " in float32, as its forward does not run in float64"
    of = "an expert's slice of W" if len(changed_shape) == 3 else "W"
    return True, (
        f"it runs with W as it is and adds the low-rank term to {products} with {of} (equal to W + dW within "
        f"{worst:.0e}{precision})"
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

    helpers = (FactoredWeightUses, _changed_shape, _last_two, _indexes_leading, _grouped, _holds, _swapped)
    return "\n\n\n".join(inspect.getsource(item).rstrip("\n") for item in helpers)
