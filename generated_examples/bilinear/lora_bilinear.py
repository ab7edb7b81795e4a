"""LoRA for `torch.nn.Bilinear`, written by lora-scaffold 0.1.0 for peft >= 0.21.

Register it with `register(config)`. Its generation record is .lora-scaffold/lora_bilinear.json.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Bilinear
from torch.overrides import TorchFunctionMode

from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.integrations import gather_params_ctx
from peft.utils.warning import PeftWarning


WEIGHT_NAME = "weight"
BIAS_NAME = None
SUPPORTED_INITS = (True, False, "gaussian")
VARIANT_SUPPORT = (
    "plain LoRA only (no DoRA: DoRA rescales a weight acting as a linear map or a convolution, and the probe found "
    "neither)"
)


def _get_attribute(module: nn.Module, name: str) -> Any:
    """getattr along a dotted name; unlike get_parameter, it also finds the plain tensors FSDP puts in its place."""
    for attribute in name.split("."):
        module = getattr(module, attribute)
    return module


def _weight_shape(module: nn.Module) -> torch.Size:
    """The base weight's shape, also where DeepSpeed ZeRO-3 has partitioned it (its local tensor is then empty)."""
    weight = _get_attribute(module, WEIGHT_NAME)
    return getattr(weight, "ds_shape", weight.shape)


def _module_below_layers(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module itself under the LoRA layers stacked on it, one a weight: their own attributes are not its."""
    while isinstance(module, LoraLayer):
        module = module.base_layer
    return module


def _computes_in_fp32(tensor: torch.Tensor) -> bool:
    """fp16/bf16 matmuls are slow or missing on CPU: LoRA computes in fp32 there, as PEFT does."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.bfloat16)


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


class LoraBilinear(nn.Module, LoraLayer):
    """LoRA layer for `Bilinear`.

    Forward runs the base module with `W + (B @ A).reshape(W.shape) * scaling`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        self.resolve_lora_variant(config=config)  # refuses every variant: this layer implements none
        self._set_up_adapter(adapter_name, r, lora_alpha, config)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._update_layer_below(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> Any:
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as exc:
            raise self._unsupported_variants(f"the variants asked for ({exc})") from None

    def _base_weight(self) -> torch.Tensor:
        return _get_attribute(self.get_base_layer(), WEIGHT_NAME)

    def _set_up_adapter(self, adapter_name: str, r: int, lora_alpha: int, options: Any) -> None:
        """What update_layer does once the API's arguments are read: `options` has LoraConfig's attribute names."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self._check_options(options)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if options.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = options.use_rslora
        self.lora_bias[adapter_name] = options.lora_bias
        dropout = nn.Dropout(p=options.lora_dropout) if options.lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout
        self._create_lora_factors(adapter_name, r, options.lora_bias)
        self.reset_lora_parameters(adapter_name, options.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _unsupported_variants(self, requested: str) -> ValueError:
        return ValueError(f"lora.{type(self).__name__} cannot apply {requested}: it supports {VARIANT_SUPPORT}.")

    def _check_options(self, options: Any) -> None:
        # Before PEFT's reset_lora_parameters, which takes any init for an embedding's factors.
        init = options.init_lora_weights
        if not any(init is option or init == option for option in SUPPORTED_INITS):
            raise ValueError(
                f"lora.{type(self).__name__} supports init_lora_weights in {SUPPORTED_INITS}, got {init!r}."
            )
        if options.lora_bias:
            raise ValueError(
                f"lora.{type(self).__name__} does not support lora_bias=True: "
                "this layer's adapters change the weight only."
            )

    _weight_cache: Optional[tuple] = None  # (what it was made of, W + dW) from the last eval forward without autograd

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        shape = _weight_shape(module)
        return math.prod(shape[1:]), shape[0]

    def _create_lora_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self._require_whole_weight(self._base_weight())
        # B @ A is an [out, in] matrix reshaped to the weight's shape (12, 5, 7).
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def _require_whole_weight(self, weight: torch.Tensor) -> None:
        # W + dW is built before the base module runs, so W must be whole by then, not only inside its forward.
        if getattr(weight, "ds_id", None) is not None:
            raise ValueError(
                f"lora.{type(self).__name__} does not support DeepSpeed ZeRO-3: its forward builds W + dW before the "
                "base module runs, while ZeRO-3 still holds W partitioned. FSDP and DDP are supported."
            )
        if getattr(weight, "device_mesh", None) is not None:
            raise ValueError(
                f"lora.{type(self).__name__} found its base module's weight sharded (a DTensor) as its forward began: "
                "apply fully_shard to this LoRA layer or a module containing it, not to its base module alone."
            )

    def _lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight

    def _compose(self, weight_A: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
        return (weight_B @ weight_A).reshape(_weight_shape(self.get_base_layer()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Inputs pass through as the module's callers give them (by keyword too: `hidden_states=...`), or none.
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                f"lora.{type(self).__name__} cannot mix adapters in one batch (`adapter_names`): "
                "its adapters change the weight itself."
            )
        if self.disable_adapters and self.merged:
            self.unmerge()
        adapters = [adapter for adapter in self.active_adapters if adapter in self.r]
        if self.disable_adapters or self.merged or not adapters:
            self._weight_cache = None
            return self.base_layer(*args, **kwargs)
        owner_name, _, attribute = WEIGHT_NAME.rpartition(".")
        owner = _get_attribute(self.get_base_layer(), owner_name) if owner_name else self.get_base_layer()
        weight = getattr(owner, attribute)
        if self.training or torch.is_grad_enabled():
            return self._forward_factored(weight, adapters, *args, **kwargs)
        effective = self._cached_effective_weight(weight, adapters)
        # The base module's own forward runs with W + dW, so the adapter is exact whatever that forward computes.
        return self._forward_with_weight(owner, attribute, effective, *args, **kwargs)

    def _forward_factored(self, weight: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> Any:
        """The module's own forward with its weight as it is: each product of an input with the weight, its
        transpose or an expert's slice of it (F.linear, matmul, bmm, grouped_mm) gets x L R added, where L @ R is
        the adapter's change of that weight, never forming W + dW (proven equal to the forward with W + dW when this
        layer was generated); any other use reads W + dW, of the same dropped-out A."""
        self._require_whole_weight(weight)
        factors, pairs = [], []
        for adapter in adapters:
            weight_A, weight_B = self._lora_factors(adapter)
            weight_A = self.lora_dropout[adapter](weight_A)
            factors.append((adapter, weight_A, weight_B))
            pairs.append(self._change_factors(weight_A, weight_B, self.scaling[adapter]))

        def effective() -> torch.Tensor:
            deltas = [self._delta_weight(adapter, weight_A, weight_B) for adapter, weight_A, weight_B in factors]
            return weight + sum(delta.reshape(weight.shape).to(weight.dtype) for delta in deltas)

        with FactoredWeightUses(weight, pairs, effective):
            return self.base_layer(*args, **kwargs)

    def _change_factors(
        self, weight_A: torch.Tensor, weight_B: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with L @ R the adapter's change of the weight."""
        return weight_B * scaling, weight_A

    def _effective_weight(self, weight: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """`W + (B @ A) * scaling` summed over `adapters`: one fused multiply-add per adapter, laid out like W."""
        self._require_whole_weight(weight)
        effective = weight.reshape(weight.shape[0], -1)
        for adapter in adapters:
            weight_A, weight_B = self._lora_factors(adapter)
            # Dropout of the input cannot be written as a change of the weight: lora_dropout drops entries of A
            # instead (DropConnect). Like input dropout, it is the identity in eval mode, so merging stays exact.
            weight_A = self.lora_dropout[adapter](weight_A)
            if weight_A.dtype == effective.dtype and not _computes_in_fp32(weight_A):
                effective = torch.addmm(effective, weight_B, weight_A, alpha=self.scaling[adapter])
            else:
                delta = self._delta_weight(adapter, weight_A, weight_B)
                effective = effective + delta.reshape(effective.shape).to(effective.dtype)
        return effective.reshape(weight.shape)

    def _cached_effective_weight(self, weight: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        # Without autograd, W + dW changes only when a tensor it is made of does: the tensors' identities, version
        # counters (bumped by every in-place write but those through `.data`) and storages tell, and switching
        # train/eval mode empties the cache as well.
        tensors = [weight]
        for adapter in adapters:
            tensors.extend(self._lora_factors(adapter))
        states = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        key = tuple(adapters), tuple(self.scaling[adapter] for adapter in adapters), states
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self._effective_weight(weight, adapters))
        return self._weight_cache[1]

    def train(self, mode: bool = True) -> LoraBilinear:
        self._weight_cache = None  # frees the eval-time W + dW
        return super().train(mode)

    def _forward_with_weight(
        self, owner: nn.Module, attribute: str, weight: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        # W + dW stands in for the weight for this one call where the module keeps it: as a parameter, or as the
        # plain attribute FSDP's use_orig_params puts in its place during forward. (functional_call swaps the same
        # entry, with several times the per-call cost.)
        slots = vars(owner) if attribute in vars(owner) else owner._parameters
        saved = slots[attribute]
        slots[attribute] = weight
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            slots[attribute] = saved

    def _update_layer_below(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Layers stacked on one module, one a weight (scan --generate's package stacks them): PEFT adds a further
        # adapter to the outermost, which passes it down.
        below = self.base_layer
        if isinstance(below, LoraLayer) and adapter_name not in below.r:
            below.update_layer(adapter_name, *args, **kwargs)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """The base module, with the adapters of this layer and of the layers stacked below it merged when `merge`:
        PEFT's merge_and_unload visits the outermost layer of a module only."""
        layer = self
        while isinstance(layer, LoraLayer):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            layer = layer.base_layer
        return layer

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The change this adapter makes to the base weight, `(B @ A) * scaling` laid out like the weight."""
        # Outside forward, DeepSpeed ZeRO-3 keeps parameters partitioned: gather them (a no-op without ZeRO-3).
        with gather_params_ctx(list(self.parameters()), modifier_rank=None):
            return self._delta_weight(adapter, *self._lora_factors(adapter))

    def _delta_weight(self, adapter: str, weight_A: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
        dtype = weight_A.dtype
        cast_to_fp32 = _computes_in_fp32(weight_A)
        if cast_to_fp32:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = self._compose(weight_A, weight_B) * self.scaling[adapter]
        return delta.to(dtype) if cast_to_fp32 else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active (or the named) adapters into the base weight; `safe_merge` checks for NaNs first."""
        # Under DeepSpeed ZeRO-3: gather the partitioned parameters, and rank 0's merged weight becomes everyone's.
        with gather_params_ctx(list(self.parameters()), modifier_rank=0):
            for adapter in check_adapters_to_merge(self, adapter_names):
                if adapter not in self.r:
                    continue
                weight = self._base_weight()
                new_weight = self._merged_weight(adapter)
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                self._write_base_weight(weight, new_weight)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", PeftWarning)
            return
        with gather_params_ctx(list(self.parameters()), modifier_rank=0):
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                if adapter not in self.r:
                    continue
                self._write_base_weight(self._base_weight(), self._unmerged_weight(adapter))

    def _write_base_weight(self, weight: torch.Tensor, value: torch.Tensor) -> None:
        weight.data = value

    def _merged_weight(self, adapter: str) -> torch.Tensor:
        weight = self._base_weight()
        return weight.data + self.get_delta_weight(adapter).to(weight.dtype)

    def _unmerged_weight(self, adapter: str) -> torch.Tensor:
        weight = self._base_weight()
        return weight.data - self.get_delta_weight(adapter).to(weight.dtype)

    def __getattr__(self, name: str) -> Any:
        # What the model around reads off the module this layer replaced (TransformerEncoderLayer reads
        # MultiheadAttention's batch_first and num_heads) comes from that module, as with PEFT's own layers.
        # Every lookup of a submodule (self.lora_A, ...) passes here: nn.Module's own is called, not through super().
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" in modules:  # else still being built: nothing to forward to yet
                return getattr(_module_below_layers(modules["base_layer"]), name)
            raise

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Make `config` dispatch `Bilinear` modules to `LoraBilinear`; returns `config`.

    PEFT does not save this mapping with an adapter: call `register` again on the config you load with, and pass it
    as `PeftModel.from_pretrained(model, path, config=config)`.
    """
    config._register_custom_module({Bilinear: _layer_or_param_wrapper})
    return config


def _layer_or_param_wrapper(target: nn.Module, adapter_name: str, parameter_name: Optional[str] = None, **kwargs):
    """The layer above for the module a config names; PEFT's own ParamWrapper, as its `dispatch_default` builds it,
    for one parameter of it PEFT is asked to wrap (`target_parameters`, or PEFT's transformers-v5 MoE conversion of
    `gate_proj`/`up_proj`/`down_proj` names into the experts' parameters): registering this layer changes nothing
    for configs PEFT takes alone."""
    if parameter_name is not None:
        return ParamWrapper(target, adapter_name, parameter_name=parameter_name, **kwargs)
    return LoraBilinear(target, adapter_name, **kwargs)
