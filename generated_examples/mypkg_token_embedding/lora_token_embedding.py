"""LoRA for `mypkg.TokenEmbedding`, written by lora-scaffold 0.1.0 for peft >= 0.21.

Register it with `register(config)`. Its generation record is .lora-scaffold/lora_token_embedding.json.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from mypkg import TokenEmbedding
from torch import nn

from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.integrations import gather_params_ctx
from peft.utils.warning import PeftWarning


WEIGHT_NAME = "weight"
BIAS_NAME = None
SUPPORTED_INITS = (True, False, "gaussian")
VARIANT_SUPPORT = "plain LoRA only (no DoRA: lora-scaffold does not generate DoRA for embeddings yet)"


def _get_attribute(module: nn.Module, name: str) -> Any:
    """getattr along a dotted name; unlike get_parameter, it also finds the plain tensors FSDP puts in its place."""
    for attribute in name.split("."):
        module = getattr(module, attribute)
    return module


def _weight_shape(module: nn.Module) -> torch.Size:
    """The base weight's shape, also where DeepSpeed ZeRO-3 has partitioned it (its local tensor is then empty)."""
    weight = _get_attribute(module, WEIGHT_NAME)
    return getattr(weight, "ds_shape", weight.shape)


def _computes_in_fp32(tensor: torch.Tensor) -> bool:
    """fp16/bf16 matmuls are slow or missing on CPU: LoRA computes in fp32 there, as PEFT does."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.bfloat16)


class LoraTokenEmbedding(nn.Module, LoraLayer):
    """LoRA layer for `TokenEmbedding`.

    The adapter adds the looked-up rows of `(B @ A).T * scaling`, as PEFT's Embedding does.
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
                "embeddings have no bias to merge it into."
            )

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        shape = _weight_shape(module)
        return shape[0], shape[1]

    def _create_lora_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        # As PEFT's Embedding: A [r, num_embeddings], B [embedding_dim, r]; lora_dropout is not applied to indices.
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def _lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]

    def _compose(self, weight_A: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
        return (weight_B @ weight_A).T

    def _lora_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        padding_idx = getattr(self.get_base_layer(), "padding_idx", None)
        after_A = F.embedding(x, self.lora_embedding_A[adapter].T, padding_idx=padding_idx)
        return (after_A @ self.lora_embedding_B[adapter].T) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # PEFT's checks are all about `adapter_names`
            self._check_forward_args(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter in self.r:
                result = self._add_lora_output(adapter, x, result)
        return result.to(result_dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample gets the adapter named for it; "__base__" (or an adapter this layer lacks) gets none."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in sorted(set(adapter_names)):
            if adapter not in self.r:
                continue
            rows = [index for index, name in enumerate(adapter_names) if name == adapter]
            result[rows] = self._add_lora_output(adapter, x[rows], result[rows])  # cast to result's dtype
        return result

    def _add_lora_output(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self._lora_output(adapter, x)

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
                return getattr(modules["base_layer"], name)
            raise

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Make `config` dispatch `TokenEmbedding` modules to `LoraTokenEmbedding`; returns `config`.

    PEFT does not save this mapping with an adapter: call `register` again on the config you load with, and pass it
    as `PeftModel.from_pretrained(model, path, config=config)`.
    """
    config._register_custom_module({TokenEmbedding: _layer_or_param_wrapper})
    return config


def _layer_or_param_wrapper(target: nn.Module, adapter_name: str, parameter_name: Optional[str] = None, **kwargs):
    """The layer above for the module a config names; PEFT's own ParamWrapper, as its `dispatch_default` builds it,
    for one parameter of it PEFT is asked to wrap (`target_parameters`, or PEFT's transformers-v5 MoE conversion of
    `gate_proj`/`up_proj`/`down_proj` names into the experts' parameters): registering this layer changes nothing
    for configs PEFT takes alone."""
    if parameter_name is not None:
        return ParamWrapper(target, adapter_name, parameter_name=parameter_name, **kwargs)
    return LoraTokenEmbedding(target, adapter_name, **kwargs)
