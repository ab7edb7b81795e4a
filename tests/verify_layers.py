"""A LoRA layer written by hand, as PEFT's documentation teaches (subclass LoraLayer, implement update_layer,
forward, merge, unmerge, get_delta_weight), for a module PEFT does not know, and mutants of it that each break one
part of PEFT's contract. tests/test_verify.py checks that `lora-scaffold verify` passes the layer and names the
check each mutant fails."""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn


class Projection(nn.Module):
    """The target: an affine map kept in its own parameters (not an nn.Linear, so PEFT has no layer for it)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LoraProjection(nn.Module, LoraLayer):
    """Plain LoRA (no DoRA) on Projection.weight: W + B @ A * scaling, lora_bias on B, mixed batches."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        """Since peft 0.18 the options come in `config` (before, as keyword arguments)."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.use_dora:
            raise ValueError("LoraProjection supports plain LoRA only, not DoRA")
        if config.init_lora_weights not in (True, False):
            raise ValueError(
                f"LoraProjection supports init_lora_weights True or False, not {config.init_lora_weights!r}"
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = self.make_dropout(config.lora_dropout)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @staticmethod
    def make_dropout(p: float) -> nn.Module:
        return nn.Dropout(p) if p > 0 else nn.Identity()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_B, weight_A = self.lora_B[adapter_name].weight, self.lora_A[adapter_name].weight
        dtype = weight_A.dtype
        if weight_A.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):  # as PEFT: float32 on CPU
            weight_B, weight_A = weight_B.float(), weight_A.float()
        return ((weight_B @ weight_A) * self.scaling[adapter_name]).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            weight = base.weight.data + self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.weight.data = weight
            if self.lora_bias[name]:
                base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)
                if self.lora_bias[name]:
                    base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
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
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self.adapter_output(name, x)
        return result

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """In the adapter's dtype (float32 under a bf16 model, by PEFT's autocast), returned in the input's."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        output = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))) * self.scaling[name]
        return output.to(x.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# Mutants: each breaks one part of the contract, the way a hand-written layer gets it wrong.


class MergeForgetsScaling(LoraProjection):
    def get_delta_weight(self, adapter_name):
        return self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight


class UnmergeDoesNotRestore(LoraProjection):
    def unmerge(self):
        self.merged_adapters.clear()


class SafeMergeDoesNotCheck(LoraProjection):
    def merge(self, safe_merge=False, adapter_names=None):
        super().merge(safe_merge=False, adapter_names=adapter_names)


class MergeLeavesFloat32(LoraProjection):
    def merge(self, safe_merge=False, adapter_names=None):
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            base.weight.data = base.weight.data.float() + self.get_delta_weight(name).float()
            self.merged_adapters.append(name)


class AcceptsRankZero(LoraProjection):
    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(adapter_name, max(r, 1), lora_alpha, config)


class DropoutInEval(LoraProjection):
    @staticmethod
    def make_dropout(p):
        return AlwaysDropout(p)


class AlwaysDropout(nn.Dropout):
    def forward(self, x):
        return F.dropout(x, self.p, training=True)


class IgnoresLoraBias(LoraProjection):
    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(adapter_name, r, lora_alpha, dataclasses.replace(config, lora_bias=False))


class SecondAdapterOverwritesFirst(LoraProjection):
    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(next(iter(self.r), adapter_name), r, lora_alpha, config)


class IgnoresDisableAdapters(LoraProjection):
    @property
    def disable_adapters(self):
        return False


class IgnoresRslora(LoraProjection):
    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(adapter_name, r, lora_alpha, dataclasses.replace(config, use_rslora=False))


class IgnoresAdapterNames(LoraProjection):
    def forward(self, x, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        return super().forward(x, *args, **kwargs)


class DefaultInitNotZero(LoraProjection):
    def reset_lora_parameters(self, adapter_name, init_lora_weights):
        pass


class AdapterAGetsNoGradient(LoraProjection):
    def adapter_output(self, name, x):
        weight_A = self.lora_A[name].weight.detach()
        return self.lora_B[name](F.linear(x, weight_A)) * self.scaling[name]


class OutputLeftInAdapterDtype(LoraProjection):
    def adapter_output(self, name, x):
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        return lora_B(lora_A(x.to(lora_A.weight.dtype))) * self.scaling[name]


# Each mutant, and the check of `verify` (the generated suites' test name, without "test_") that must catch it.
MUTANTS = {
    MergeForgetsScaling: "merged output equals unmerged",
    UnmergeDoesNotRestore: "unmerge restores base weights",
    SafeMergeDoesNotCheck: "safe merge rejects nan adapter",
    MergeLeavesFloat32: "fp16 merge on cpu",
    AcceptsRankZero: "rank must be positive",
    DropoutInEval: "lora dropout acts in training only",
    IgnoresLoraBias: "lora bias merges into base bias",
    SecondAdapterOverwritesFirst: "two adapters switch and one deletes",
    IgnoresDisableAdapters: "disable adapter gives base output",
    IgnoresRslora: "rslora scaling",
    IgnoresAdapterNames: "mixed batch gives each sample its adapter",
    DefaultInitNotZero: "default init keeps output",
    AdapterAGetsNoGradient: "only lora parameters train and all get gradients",
    OutputLeftInAdapterDtype: "bf16 forward is finite and near float32",
}
