"""LoRA for `torch.nn.EmbeddingBag`, written by lora-scaffold 0.1.0 for peft >= 0.21.

Register it with `register(config)`. Its generation record is .lora-scaffold/lora_embedding_bag.json.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import EmbeddingBag

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


class LoraEmbeddingBag(nn.Module, LoraLayer):
    """LoRA layer for `EmbeddingBag`.

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
        # B @ A is an [out, in] matrix reshaped to the weight's shape (20, 8).
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
            effective = self._effective_weight(weight, adapters)
        else:
            effective = self._cached_effective_weight(weight, adapters)
        # The base module's own forward runs with W + dW, so the adapter is exact whatever that forward computes.
        return self._forward_with_weight(owner, attribute, effective, *args, **kwargs)

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

    def train(self, mode: bool = True) -> LoraEmbeddingBag:
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
    """Make `config` dispatch `EmbeddingBag` modules to `LoraEmbeddingBag`; returns `config`.

    PEFT does not save this mapping with an adapter: call `register` again on the config you load with, and pass it
    as `PeftModel.from_pretrained(model, path, config=config)`.
    """
    config._register_custom_module({EmbeddingBag: _layer_or_param_wrapper})
    return config


def _layer_or_param_wrapper(target: nn.Module, adapter_name: str, parameter_name: Optional[str] = None, **kwargs):
    """The layer above for the module a config names; PEFT's own ParamWrapper, as its `dispatch_default` builds it,
    for one parameter of it PEFT is asked to wrap (`target_parameters`, or PEFT's transformers-v5 MoE conversion of
    `gate_proj`/`up_proj`/`down_proj` names into the experts' parameters): registering this layer changes nothing
    for configs PEFT takes alone."""
    if parameter_name is not None:
        return ParamWrapper(target, adapter_name, parameter_name=parameter_name, **kwargs)
    return LoraEmbeddingBag(target, adapter_name, **kwargs)
