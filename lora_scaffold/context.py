"""The answers the templates are rendered with: one frozen value, whose fields are exactly `templates/copier.yml`'s
questions (tests/test_render.py holds the two equal), built once per (plan, PEFT release) by `render.layer_context`.
`verify` and patch mode's battery model take it with `dataclasses.replace`; nothing edits answers in place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerContext:
    """copier.yml says what each answer is; those with a default there are the ones only some partials read."""

    version: str
    init_std: float
    target_spec: str
    target_module: str
    target_class: str
    target_name: str
    layer_class: str
    module_name: str
    test_module: str
    plugin: bool
    peft_versions: str
    license_header: str
    record_path: str
    strategy: str
    strategy_summary: str
    layer_partial: str
    strategy_partial: str
    weight_name: str
    weight_shape: str
    weight_path: str
    bias_name: str
    bias_name_literal: str
    fan_in_fan_out: bool
    mixed_batch: bool
    uses_dropout: bool
    flat_rnn_weights: bool
    refused_options: dict[str, tuple[str, ...]]
    refusal_cases: tuple[str, ...]
    lora_bias_option: bool
    dora_variant: str
    tests_dora: bool
    dora_unmerge_transposed: bool
    variant_support: str
    dora_norm_dims: str
    api: str
    tagged_variants: bool
    set_adapter_inference_mode: bool
    device_hook: bool
    cast_input_dtype: bool
    missing_dicts: tuple[str, ...]
    peft_warning: bool
    imports: str
    test_imports: str
    optional_target: str
    peft_builtin: str
    ctor_call: str
    inputs_expression: str
    test_rank: int
    eval_only: str
    param_wrapper: bool = False
    verify: bool = False
    weight_cache: bool = False
    computed_weight: bool = False
    read_by_fused_parents: bool = False
    uninitialised: tuple[str, ...] = ()
    model_call: bool = False
    call_keywords: bool = False
    captured_model: str = ""
    captured_module: str = ""
    model_input: str = ""
    model_uninitialised: tuple[str, ...] = ()
    strategy_answers: dict[str, Any] = field(default_factory=dict)
    declares_fan_in_fan_out: bool = False
    battery_class: str = ""
    battery_imports: tuple[str, ...] = ()
    battery_input_layers: tuple[str, ...] = ()
    battery_ctor: str = ""
    battery_inputs: str = ""
    output_features: int = 0
    output_is_tuple: bool = False

    def answers(self) -> dict:
        """The answers as jinja2 and copier take them (sequences as lists, as YAML gives them)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}
