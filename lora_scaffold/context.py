"""The answers the templates are rendered with: one frozen value, whose fields are exactly `templates/copier.yml`'s
questions (tests/test_render.py holds the two equal), built once per (plan, PEFT release) by `render.layer_context`.
`verify` and patch mode's battery model take it with `dataclasses.replace`; nothing edits answers in place.

Every text answer is typed by what it becomes in the generated file (`Identifier`, `Expression`, `Statements`,
`Prose`, ...), and checked for being that when the context is made: a string that would end a docstring or break a
statement is refused here, naming the answer, rather than found by the parse of the rendered file."""

from __future__ import annotations

import ast
import functools
import keyword
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated

from lora_scaffold.errors import RenderError


@dataclass(frozen=True)
class Kind:
    """What an answer becomes in generated code, and the check that it is that."""

    name: str
    holds: Callable[[str], bool]


def _identifier(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def _parses(source: str, mode: str) -> bool:
    try:
        ast.parse(source, mode=mode)
    except (SyntaxError, ValueError):
        return False
    return True


IDENTIFIER = Kind("a Python name", _identifier)
DOTTED = Kind("a dotted Python name", lambda text: all(_identifier(part) for part in text.split(".")))
# Written into code by `tojson`, which makes a string literal of any text (a parameter named "a-b" by
# register_parameter included).
JSON_TEXT = Kind("text the template writes with tojson", lambda text: True)
# Laid out for the line the template puts it on (later lines carry their indentation): brackets make that moot.
EXPRESSION = Kind("a Python expression", lambda text: _parses(f"(\n{text}\n)", "eval"))
STATEMENTS = Kind("Python statements at column 0", lambda text: _parses(text, "exec"))
PROSE = Kind(
    "one line of text for a docstring or comment",
    lambda text: "\n" not in text and '"""' not in text and "\\" not in text and not text.endswith('"'),
)
TEMPLATE = Kind("a partial of templates/", lambda text: text.startswith("partials/") and text.endswith(".jinja"))

Identifier = Annotated[str, IDENTIFIER]
Dotted = Annotated[str, DOTTED]
JsonText = Annotated[str, JSON_TEXT]
Expression = Annotated[str, EXPRESSION]
Statements = Annotated[str, STATEMENTS]
Prose = Annotated[str, PROSE]
Template = Annotated[str, TEMPLATE]


@dataclass(frozen=True)
class LayerContext:
    """copier.yml says what each answer is; those with a default there are the ones only some partials read."""

    version: Prose
    init_std: float
    target_spec: Dotted
    target_module: Dotted
    target_class: Identifier
    target_name: Identifier
    layer_class: Identifier
    module_name: Identifier
    test_module: Identifier
    plugin: bool
    peft_versions: Prose
    license_header: Statements
    record_path: Prose
    strategy: Identifier
    strategy_summary: Prose
    layer_partial: Template
    peft_own_layer: bool
    strategy_partial: Template
    weight_name: Expression
    weight_shape: Expression
    weight_path: Expression
    wrapped_weight_name: Expression
    bias_name: Expression
    bias_name_literal: Expression
    fan_in_fan_out: bool
    mixed_batch: bool
    uses_dropout: bool
    dropout_unapplied: bool
    flat_rnn_weights: bool
    refused_options: dict[str, tuple[Expression, ...]]
    refusal_cases: tuple[Expression, ...]
    merges_lora_bias: bool
    never_merged: bool
    tests_lora_bias_without_base_bias: bool
    bias_attribute: Identifier
    lora_bias_option: bool
    dora_variant: Identifier
    tests_dora: bool
    dora_unmerge_transposed: bool
    variant_support: Expression
    dora_norm_dims: Expression
    api: Identifier
    checks_inference_mode_alone: bool
    inference_mode_in_config: bool
    rslora_set_scale: bool
    tagged_variants: bool
    set_adapter_inference_mode: bool
    device_hook: bool
    weight_name_differs: bool
    base_has_children: bool
    stackable: bool
    cast_input_dtype: bool
    missing_dicts: tuple[Identifier, ...]
    peft_warning: bool
    imports: Statements
    test_imports: Statements
    optional_target: Statements
    peft_builtin: Identifier
    ctor_call: Expression
    inputs_expression: Expression
    test_rank: int
    eval_only: Prose
    compared_modes: Expression
    settles: Prose = ""
    param_wrapper: bool = False
    verify: bool = False
    weight_cache: bool = False
    computed_weight: bool = False
    merges: bool = True
    tolerant_merge: bool = False
    quantized_weight: bool = False
    round_trip_source: Statements = ""
    factored_source: Statements = ""
    factored_dtype: Identifier = ""
    factored_tolerance: float = 0.0
    quantization_backend: bool = False
    stored_in: Identifier = ""
    held_beside: Expression = ""
    held_beside_key: Identifier = ""
    parameterless_target: bool = False
    read_by_fused_parents: bool = False
    uninitialised: tuple[JsonText, ...] = ()
    model_call: bool = False
    call_keywords: bool = False
    captured_model: Expression = ""
    captured_module: Expression = ""
    model_input: Expression = ""
    model_uninitialised: tuple[JsonText, ...] = ()
    strategy_answers: dict[str, Expression] = field(default_factory=dict)  # its text answers are code
    declares_fan_in_fan_out: bool = False
    battery_class: Identifier = ""
    battery_imports: tuple[Statements, ...] = ()
    battery_input_layers: tuple[Statements, ...] = ()
    battery_ctor: Expression = ""
    battery_inputs: Expression = ""
    output_features: int = 0
    output_is_tuple: bool = False

    def __post_init__(self):
        for name, kind in _answer_kinds().items():
            for text in _texts(getattr(self, name)):
                if text and not kind.holds(text):
                    raise RenderError(f"answer {name} should be {kind.name}, got {text!r}")

    def answers(self) -> dict:
        """The answers as jinja2 and copier take them (sequences as lists, as YAML gives them)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}


@functools.cache
def _answer_kinds() -> dict[str, Kind]:
    """Each text answer's kind, read from the annotations once (every render builds several contexts)."""
    hints = typing.get_type_hints(LayerContext, include_extras=True)
    kinds = {answer.name: kind_of(hints[answer.name]) for answer in fields(LayerContext)}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def kind_of(hint) -> Kind | None:
    """The kind an answer's type names: its own (`Expression`), or its items' (`tuple[Expression, ...]`, a dict's
    values)."""
    if typing.get_origin(hint) is Annotated:
        return next(meta for meta in typing.get_args(hint)[1:] if isinstance(meta, Kind))
    items = [kind_of(arg) for arg in typing.get_args(hint) if arg is not Ellipsis]
    return next((kind for kind in items if kind is not None), None)


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _texts(item)]
    if isinstance(value, (tuple, list)):
        return [text for item in value for text in _texts(item)]
    return []
