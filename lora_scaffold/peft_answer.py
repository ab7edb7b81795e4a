"""What PEFT's LoRA itself does with one module of a model, asked of PEFT (never of a table of ours): the layer its
dispatch builds for the module, or the parameters its transformers-v5 MoE conversion targets instead."""

from __future__ import annotations

import warnings

from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS


def peft_layer(module: nn.Module, name: str, model: nn.Module) -> str:
    """`lora.X` for the layer PEFT builds when a config names this module, `lora.ParamWrapper on P` when PEFT turns
    that name into its parameters (MoE routers of transformers 5), "refused: ..." with PEFT's reason when it raises for
    this instance, "" when PEFT does not support the type."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    leaf = name.rpartition(".")[2] or name
    converted = _converted_parameters(leaf, model)
    if converted:
        return f"lora.ParamWrapper on {', '.join(converted)} (PEFT's transformers-v5 MoE conversion of {leaf!r})"
    config = LoraConfig(target_modules=[leaf], r=2)
    try:
        _check_in_model(config, model, leaf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = LoraModel._create_new_module(config, "default", module, r=2, lora_alpha=2, target_name=name)
    except USER_CODE_ERRORS as exc:
        message = " ".join(str(exc).split())
        return "" if "is not supported" in message else f"refused: {type(exc).__name__}: {message[:200]}"
    return f"lora.{type(layer).__name__}"


def _converted_parameters(leaf: str, model: nn.Module) -> list[str]:
    """The parameters PEFT's config conversion targets when a config names `leaf` in this model (none elsewhere)."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # peft before the transformers-v5 conversion
        return []
    config = LoraConfig(target_modules=[leaf], r=2)
    try:
        convert_peft_config_for_transformers(config, model, None)
    except USER_CODE_ERRORS:
        return []
    if leaf in (config.target_modules or ()):
        return []
    return sorted(p for p in (config.target_parameters or ()) if p.startswith(f"{leaf}."))


def _check_in_model(config, model: nn.Module, leaf: str) -> None:
    """PEFT's own refusals that depend on the model, not on the module (Mamba's out_proj and conv1d)."""
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:  # a peft without the check
        return
    _check_lora_target_modules_mamba(config, model, leaf)
