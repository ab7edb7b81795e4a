"""Stage 4: render the layer module and its tests from `templates/` into memory (nothing touches the disk here)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2

from lora_scaffold import __version__
from lora_scaffold.analyse import LayerPlan
from lora_scaffold.imports import format_imports
from lora_scaffold.peft_api import CONFIG_API, KWARGS_API


TEMPLATE_SUFFIX = ".jinja"
PLUGIN, PATCH = "plugin", "patch"
NOT_RENDERED = ("copier.yml", "partials")

SUMMARIES = {
    "linear": "the adapter adds `lora_B(lora_A(dropout(x))) * scaling`, as PEFT's Linear does.",
    "conv": "the adapter adds `lora_B(lora_A(dropout(x))) * scaling`, lora_A convolving like the base layer.",
    "conv_transpose": (
        "the adapter adds `lora_B(lora_A(dropout(x))) * scaling`, lora_A a transposed conv like the base layer."
    ),
    "embedding": "the adapter adds the looked-up rows of `(B @ A).T * scaling`, as PEFT's Embedding does.",
    "delta": "forward runs the base module with `W + (B @ A).reshape(W.shape) * scaling`.",
    "stub": "a skeleton to fill in; its methods raise NotImplementedError until then.",
    "reuse": "PEFT's own layer for the parent class.",
}

API_LINES = {
    CONFIG_API: "Written for the layer API of peft >= 0.19 (options come in a LoraConfig).",
    KWARGS_API: "Written for the layer API of peft 0.13 - 0.18 (options come as keyword arguments).",
}

# LoraConfig options a strategy cannot honour: (reason, keyword arguments that request the option).
UNSUPPORTED_OPTIONS = {
    "delta": {"lora_bias": ("this layer's adapters change the weight only", '"lora_bias": True')},
    "embedding": {"lora_bias": ("embeddings have no bias to merge it into", '"lora_bias": True')},
}


@dataclass(frozen=True)
class GeneratedFile:
    path: str
    text: str


def template_dir() -> Path:
    """Inside an installed wheel the templates sit in the package; in a source checkout, at the repository root."""
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def template_context(plan: LayerPlan, mode: str = PLUGIN, api: str = CONFIG_API, lora_variants: bool = True) -> dict:
    """`lora_variants`: whether the peft generated for has PEFT's LoRA variants (0.16 on), which DoRA goes through."""
    unsupported = UNSUPPORTED_OPTIONS.get(plan.strategy, {})
    dora_blocker = dora_blocker_for(plan, lora_variants)
    dora_variant = "" if dora_blocker or plan.strategy == "reuse" else _dora_variant(plan)
    ctor_args = ", ".join(f"{name}={source}" for name, source in plan.ctor_args)
    return {
        "version": __version__,
        "command": plan.command,
        "target_spec": plan.target_spec,
        "target_module": plan.target_module,
        "target_class": plan.target_class,
        "layer_class": plan.layer_class,
        "module_name": plan.module_name,
        "test_module": plan.test_module,
        "strategy": plan.strategy,
        "strategy_summary": SUMMARIES[plan.strategy],
        "reason": plan.reason[:1].upper() + plan.reason[1:],
        "weight_name": plan.weight_name,
        "weight_shape": str(plan.weight_shape),
        "weight_path": json.dumps(plan.weight_name.split(".")),
        "bias_name": plan.bias_name or "",
        "bias_name_literal": json.dumps(plan.bias_name) if plan.bias_name else "None",
        "fan_in_fan_out": plan.fan_in_fan_out,
        "conv_class": _conv_class(plan),
        "mixed_batch": plan.strategy != "delta",
        "flat_rnn_weights": plan.flat_rnn_weights,
        "unsupported_options": {option: reason for option, (reason, _) in unsupported.items()},
        "unsupported_cases": _unsupported_cases(plan.strategy, dora_blocker, api),
        "guard_lora_bias": api == KWARGS_API,
        "dora_variant": dora_variant,
        "variant_support": json.dumps(
            f"plain LoRA only (no DoRA: {dora_blocker})" if dora_blocker else "plain LoRA and DoRA"
        ),
        "dora_norm_dims": _dora_norm_dims(plan),
        "imports": format_imports(layer_imports(plan, mode, api, dora_variant)),
        "api": api,
        "layer_partial": "partials/reuse_layer.jinja" if plan.strategy == "reuse" else "partials/full_layer.jinja",
        "api_line": API_LINES[api],
        "test_imports": format_imports(test_imports(plan, mode), first_party=("peft", plan.module_name)),
        "plugin": mode == PLUGIN,
        "optional_target": "" if _importable_by_peft(plan, mode) else _importorskip(plan),
        "peft_builtin": plan.peft_builtin or "",
        "builtin_note": _builtin_note(plan),
        "ctor_call": f"{plan.target_class}({ctor_args})",
        "inputs_expression": _as_tuple(plan.example_input),
        "test_rank": plan.test_rank,
    }


def dora_blocker_for(plan: LayerPlan, lora_variants: bool) -> str:
    """Why the generated layer refuses DoRA ("" when it offers it)."""
    if not lora_variants and plan.strategy != "reuse":
        return "DoRA goes through PEFT's LoRA variants, which arrived in peft 0.16"
    return plan.dora_blocker


def layer_imports(plan: LayerPlan, mode: str, api: str, dora_variant: str = "") -> list[tuple[str, tuple[str, ...]]]:
    # Inside the peft package, imports are relative, as PEFT's own backends do (`from peft import` would be circular).
    package = "peft.tuners.lora." if mode == PLUGIN else "."
    target = [(plan.target_module, (plan.target_class,))] if mode == PLUGIN else []
    # LoraConfig is read by the config API and typed in plugin mode's register().
    config = [(f"{package}config" if mode == PATCH else "peft", ("LoraConfig",))]
    if plan.strategy == "reuse":
        return target + [(f"{package}layer", (plan.peft_builtin,))] + (config if mode == PLUGIN else [])
    imports = [
        ("__future__", ("annotations",)),
        ("math", ()),
        ("warnings", ()),
        ("typing", ("Any", "Optional")),
        ("torch", ()),
        ("torch", ("nn",)),
        ("peft.tuners.tuners_utils", ("check_adapters_to_merge",)),
        (f"{package}layer", ("LoraLayer",)),
        *target,
        *(config if api == CONFIG_API or mode == PLUGIN else []),
    ]
    if api == KWARGS_API:
        imports.append(("types", ("SimpleNamespace",)))
    if dora_variant:
        imports.append((f"{package}variants", (dora_variant,)))
    if plan.strategy == "embedding":
        imports.append(("torch.nn.functional as F", ()))
    if plan.strategy == "delta":
        imports.append(("torch.func", ("functional_call",)))
    return imports


def test_imports(plan: LayerPlan, mode: str) -> list[tuple[str, tuple[str, ...]]]:
    imports = [
        ("copy", ()),
        ("math", ()),
        ("pytest", ()),
        ("torch", ()),
        ("torch", ("nn",)),
        ("peft", ("LoraConfig", "PeftModel", "get_peft_model")),
    ]
    if mode == PLUGIN:
        imports.append((plan.module_name, (plan.layer_class, "register")))
    else:
        imports.append((f"peft.tuners.lora.{plan.module_name}", (plan.layer_class,)))
    if _importable_by_peft(plan, mode):
        imports.append((plan.target_module, (plan.target_class,)))
    return imports


def _importable_by_peft(plan: LayerPlan, mode: str) -> bool:
    """Plugin output imports its target; inside peft, only torch's classes are sure to be installed."""
    return mode == PLUGIN or plan.target_in_torch


def _importorskip(plan: LayerPlan) -> str:
    return f'{plan.target_class} = pytest.importorskip("{plan.target_module}").{plan.target_class}\n\n\n'


def render(
    plan: LayerPlan, mode: str = PLUGIN, api: str = CONFIG_API, lora_variants: bool = True
) -> tuple[GeneratedFile, ...]:
    return render_templates(template_context(plan, mode, api, lora_variants))


def _environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_snippet(name: str, context: dict) -> str:
    """A piece of code that patch mode inserts into an existing file (not a file of its own)."""
    return _environment(template_dir()).get_template(name).render(context)


def render_templates(context: dict, root: Path | None = None) -> tuple[GeneratedFile, ...]:
    root = root or template_dir()
    environment = _environment(root)
    files = []
    for source in sorted(root.rglob(f"*{TEMPLATE_SUFFIX}")):
        relative = source.relative_to(root)
        if relative.parts[0] in NOT_RENDERED:
            continue
        path = environment.from_string(relative.as_posix().removesuffix(TEMPLATE_SUFFIX)).render(context)
        files.append(GeneratedFile(path, environment.get_template(relative.as_posix()).render(context)))
    return tuple(files)


def _builtin_note(plan: LayerPlan) -> str:
    if not plan.peft_builtin or plan.strategy == "reuse":
        return ""
    return (
        f"PEFT has a built-in layer for this type (`peft.tuners.lora.{plan.peft_builtin}`): once registered, this "
        "layer overrides it."
    )


def _unsupported_cases(strategy: str, dora_blocker: str, api: str) -> list[str]:
    """The parametrize entries (options, error text) the generated tests expect a ValueError for; PEFT's own layers
    (reuse) support them all. On the kwargs API a lora_bias case skips where LoraConfig predates the option."""
    if strategy == "reuse":
        return []
    cases = [('"use_dora": True', "no DoRA")] if dora_blocker else []
    cases.append(('"init_lora_weights": "pissa"', "init_lora_weights"))
    cases += [(kwargs, option) for option, (_, kwargs) in UNSUPPORTED_OPTIONS.get(strategy, {}).items()]
    return [
        _parametrize_entry(kwargs, message, api == KWARGS_API and "lora_bias" in kwargs) for kwargs, message in cases
    ]


def _parametrize_entry(kwargs: str, message: str, needs_lora_bias: bool) -> str:
    if needs_lora_bias:
        return f'pytest.param({{{kwargs}}}, "{message}", marks=needs_lora_bias)'
    return f'({{{kwargs}}}, "{message}")'


def _dora_variant(plan: LayerPlan) -> str:
    return "DoraLinearVariant" if plan.strategy == "linear" else f"DoraConv{plan.conv_dims}dVariant"


def _dora_norm_dims(plan: LayerPlan) -> str:
    """The weight dimensions DoRA's norm runs over: all but the output one."""
    if plan.strategy == "linear":
        return "0" if plan.fan_in_fan_out else "1"
    return str(tuple(range(1, len(plan.weight_shape))))


def _conv_class(plan: LayerPlan) -> str:
    if plan.strategy == "conv":
        return f"nn.Conv{plan.conv_dims}d"
    if plan.strategy == "conv_transpose":
        return f"nn.ConvTranspose{plan.conv_dims}d"
    return ""


def _as_tuple(expression: str) -> str:
    is_tuple = isinstance(ast.parse(expression, mode="eval").body, ast.Tuple)
    return expression if is_tuple else f"({expression},)"
