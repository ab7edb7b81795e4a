"""LoRA for `mypkg.Int8WeightOnlyLinear`, written by lora-scaffold 0.1.0 for peft >= 0.21.

Register it with `register(config)`. Its generation record is .lora-scaffold/lora_int8_weight_only_linear.json.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from mypkg import Int8WeightOnlyLinear
from torch import nn

from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.integrations import gather_params_ctx
from peft.utils.warning import PeftWarning


WEIGHT_NAME = "qweight"
BIAS_NAME = None
SUPPORTED_INITS = (True, False, "gaussian")
VARIANT_SUPPORT = "plain LoRA only (no DoRA: DoRA rescales the weight, which this base keeps quantized)"


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


def _computes_in(tensor: torch.Tensor) -> bool:
    """A plain floating tensor of 16 bits or more: what the base computes in, unlike its quantized storage."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point() and tensor.element_size() >= 2


def _storage(tensor: torch.Tensor) -> str:
    """int8, float8_e4m3fn, ... or the tensor subclass keeping quantized data behind a float dtype."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return str(tensor.dtype).removeprefix("torch.")
    return type(tensor).__name__


def _compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base computes in: the one it says (bitsandbytes' and hqq's layers), else that of its floating
    tensors other than the quantized weight."""
    compute_dtype = getattr(base, "compute_dtype", None)
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    floats = [t for t in (*base.parameters(), *base.buffers()) if _computes_in(t)]
    return floats[0].dtype if floats else torch.get_default_dtype()


def _base_map(base: nn.Module, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's map, measured on basis inputs in the dtype it computes in: its weight [out, in] and offset."""
    device, dtype = _get_attribute(base, WEIGHT_NAME).device, _compute_dtype(base)
    with torch.no_grad():
        offset = base(torch.zeros(1, in_features, dtype=dtype, device=device))[0]
        return (base(torch.eye(in_features, dtype=dtype, device=device)) - offset).T.contiguous(), offset


class LoraInt8WeightOnlyLinear(nn.Module, LoraLayer):
    """LoRA layer for `Int8WeightOnlyLinear`.

    The adapter adds `lora_B(lora_A(dropout(x))) * scaling` beside the base's forward, which it never changes.
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

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # PEFT gives the adapter the dtype of `weight` or `qweight`; here that is the quantized storage, and the
        # adapter takes the dtype the base computes in (that of its floating tensors other than the weight).
        return _get_attribute(base_layer, WEIGHT_NAME).device, _compute_dtype(base_layer)

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

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # WEIGHT_NAME is stored quantized, its shape packed or not: the module's own attributes give its sizes.
        return (
            _get_attribute(module, "in_features"),
            _get_attribute(module, "out_features"),
        )

    def _create_lora_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def _compose(self, weight_A: torch.Tensor, weight_B: torch.Tensor) -> torch.Tensor:
        return weight_B @ weight_A

    def _lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight

    def _lora_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        lora_A = self.lora_A[adapter]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        dropout = self.lora_dropout[adapter]
        if not isinstance(dropout, nn.Identity):  # an Identity's call costs more than this layer's own logic
            x = dropout(x)
        return self.lora_B[adapter](lora_A(x)) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # PEFT's checks are all about `adapter_names`
            self._check_forward_args(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
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
        """Refused: W + dW written back into the quantized weight would keep little of dW."""
        if check_adapters_to_merge(self, adapter_names):
            base = self.get_base_layer()
            raise ValueError(
                f"lora.{type(self).__name__} cannot merge into {type(base).__name__}.{WEIGHT_NAME}, stored as "
                f"{_storage(_get_attribute(base, WEIGHT_NAME))}: writing W + dW back into it would lose most of dW. "
                f"Keep the adapter unmerged, or export float layers: {type(self).__name__}.unload_dequantized(model)."
            )

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do.", PeftWarning)

    def _base_map(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return _base_map(base, self.in_features)

    def dequantized_linear(self) -> nn.Linear:
        """The lossless export: a float `nn.Linear` computing the base's map, with the active adapters' dW and
        lora_bias added. The quantized base is unchanged."""
        weight, bias = self._base_map(self.get_base_layer())
        with torch.no_grad():
            for adapter in self.active_adapters:
                if adapter in self.r:
                    weight += self.get_delta_weight(adapter)  # in place: cast to the export's dtype
                    if self.lora_B[adapter].bias is not None:
                        bias += self.lora_B[adapter].bias * self.scaling[adapter]
        linear = nn.Linear(self.in_features, self.out_features, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return linear

    @classmethod
    def unload_dequantized(cls, model: nn.Module) -> nn.Module:
        """`merge_and_unload` with these layers exported by `dequantized_linear` instead of merged into their
        quantized storage; PEFT merges and unloads the other LoRA layers. `model` is a PeftModel."""
        for name, module in list(model.named_modules()):
            if isinstance(module, cls):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.dequantized_linear())
        return model.merge_and_unload()

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
    """Make `config` dispatch `Int8WeightOnlyLinear` modules to `LoraInt8WeightOnlyLinear`; returns `config`.

    PEFT does not save this mapping with an adapter: call `register` again on the config you load with, and pass it
    as `PeftModel.from_pretrained(model, path, config=config)`.
    """
    config._register_custom_module({Int8WeightOnlyLinear: _layer_or_param_wrapper})
    return config


def _layer_or_param_wrapper(target: nn.Module, adapter_name: str, parameter_name: Optional[str] = None, **kwargs):
    """The layer above for the module a config names; PEFT's own ParamWrapper, as its `dispatch_default` builds it,
    for one parameter of it PEFT is asked to wrap (`target_parameters`, or PEFT's transformers-v5 MoE conversion of
    `gate_proj`/`up_proj`/`down_proj` names into the experts' parameters): registering this layer changes nothing
    for configs PEFT takes alone."""
    if parameter_name is not None:
        return ParamWrapper(target, adapter_name, parameter_name=parameter_name, **kwargs)
    return LoraInt8WeightOnlyLinear(target, adapter_name, **kwargs)
