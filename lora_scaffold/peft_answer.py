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
    wrapped, named = _converted_parameters(name, module, model)
    if wrapped:
        listed = ", ".join(repr(n) for n in named)
        return f"lora.ParamWrapper on {', '.join(wrapped)} (PEFT's transformers-v5 MoE conversion of {listed})"
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


def _converted_parameters(name: str, module: nn.Module, model: nn.Module) -> tuple[list[str], list[str]]:
    """(the module's parameters PEFT's config conversion wraps, the names a config gives that do it): the module's
    own name (a router's `gate`), else the model's other module names together (shared experts' `gate_proj`,
    `up_proj` and `down_proj` become the routed experts' fused parameters). Nothing for a model PEFT does not
    convert."""
    leaf = name.rpartition(".")[2] or name
    everything = sorted({n.rpartition(".")[2] for n, _ in model.named_modules() if n})

    def own(entries: list[str] | None) -> list[str]:
        return [
            f"{leaf}.{parameter}"
            for parameter, _ in module.named_parameters()
            if any(f"{name}.{parameter}".endswith(f".{entry}") for entry in entries or ())
        ]

    for names in ([leaf], everything):
        wrapped = own(_converted(names, model))
        if wrapped:
            # The names that do it are those without which the module loses a wrapped parameter. Which names PEFT
            # also keeps as module targets differs between versions (0.22 keeps shared experts' `down_proj`), so it
            # is asked by leaving each out. Only names PEFT converts alone, or refuses alone (half a fused pair),
            # can matter.
            alone = {n: _converted([n], model) for n in names}
            candidates = [n for n, targets in alone.items() if targets is None or targets]
            needed = [n for n in candidates if own(_converted([m for m in names if m != n], model)) != wrapped]
            return wrapped, needed or candidates
    return [], []


def _converted(names: list[str], model: nn.Module) -> list[str] | None:
    """The parameters PEFT's conversion targets for a config naming these modules; None when PEFT refuses the
    names (half a fused pair: gate_proj without up_proj)."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # peft before the transformers-v5 conversion
        return []
    config = LoraConfig(target_modules=list(names), r=2)
    try:
        convert_peft_config_for_transformers(config, model, None)
    except USER_CODE_ERRORS:
        return None
    return sorted(config.target_parameters or ())


def _check_in_model(config, model: nn.Module, leaf: str) -> None:
    """PEFT's own refusals that depend on the model, not on the module (Mamba's out_proj and conv1d)."""
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:  # a peft without the check
        return
    _check_lora_target_modules_mamba(config, model, leaf)
