"""Stage 4: render the layer module and its tests from `templates/` into memory (nothing touches the disk here)."""

from __future__ import annotations

import ast
import fnmatch
import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import jinja2
import yaml

from lora_scaffold import __version__, factored, init_expression, peft_release, round_trips
from lora_scaffold.context import LayerContext
from lora_scaffold.errors import RenderError
from lora_scaffold.files import GeneratedFile
from lora_scaffold.generated_imports import layer_imports, optional_imports, test_imports
from lora_scaffold.import_blocks import format_imports
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.layout import LINE_LENGTH, assigned_string, layout, string_lines
from lora_scaffold.names import is_name, target_alias
from lora_scaffold.peft_release import LICENSE_HEADER, PLUGIN, PeftRelease
from lora_scaffold.record import record_path
from lora_scaffold.uninitialised import INIT_STD


TEMPLATE_SUFFIX = ".jinja"


def template_dir() -> Path:
    """Inside an installed wheel the templates sit in the package; in a source checkout, at the repository root."""
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def dora_refusal(plan: LayerPlan, peft: PeftRelease) -> str:
    """Why the generated layer refuses DoRA ("" when it offers it)."""
    if plan.decision.chosen.peft_own_layer:
        return ""
    if not peft.has(peft_release.LORA_VARIANTS):
        return "DoRA goes through PEFT's LoRA variants, which arrived in peft 0.16"
    return plan.decision.dora_blocker


def layer_context(plan: LayerPlan, peft: PeftRelease) -> LayerContext:
    strategy = plan.decision.chosen
    refusal = dora_refusal(plan, peft)
    dora_variant = "" if refusal or strategy.peft_own_layer else strategy.dora_variant(plan.weight.shape)
    support = f"plain LoRA only (no DoRA: {refusal})" if refusal else "plain LoRA and DoRA"
    make_target_head = "target = " if plan.target.uninitialised else "return "
    # PEFT's own layers (reuse) are tested as PEFT wrote them: with lora_bias on a base without a bias, its Linear
    # writes the weight before it fails on the bias.
    merges_lora_bias = strategy.merges and "lora_bias" not in strategy.refused_options and not strategy.peft_own_layer
    bias_attribute = plan.weight.bias_name if is_name(plan.weight.bias_name or "") else ""
    return LayerContext(
        **{
            "version": __version__,
            "init_std": INIT_STD,
            "target_spec": f"{plan.target.module}.{plan.target.class_name}",
            "target_module": plan.target.module,
            "target_class": plan.target.class_name,
            "target_name": target_alias(plan.target.class_name),
            "layer_class": plan.names.layer_class,
            "module_name": plan.names.module_name,
            "test_module": plan.names.test_module,
            "plugin": peft.mode == PLUGIN,
            "peft_versions": peft.versions,
            "license_header": LICENSE_HEADER,
            "record_path": record_path(plan.names.module_name),
            "strategy": plan.decision.strategy,
            "strategy_summary": strategy.summary,
            "layer_partial": strategy.layer_partial,
            "peft_own_layer": strategy.peft_own_layer,
            "strategy_partial": strategy.partial,
            "weight_name": _literal(plan.weight.name),
            "weight_shape": str(plan.weight.shape),
            "weight_path": json.dumps(plan.weight.name.split(".")),
            "wrapped_weight_name": _literal(f"target.{plan.weight.name}"),
            "bias_name": _literal(plan.weight.bias_name) if plan.weight.bias_name else "",
            "bias_name_literal": _literal(plan.weight.bias_name) if plan.weight.bias_name else "None",
            "fan_in_fan_out": plan.decision.fan_in_fan_out,
            "mixed_batch": strategy.mixed_batch,
            "uses_dropout": strategy.uses_dropout,
            "dropout_unapplied": not strategy.uses_dropout,
            "flat_rnn_weights": plan.weight.flat_rnn,
            "read_by_fused_parents": plan.weight.read_by_fused_parents,
            "computed_weight": plan.weight.computed,
            "merges": strategy.merges,
            "tolerant_merge": plan.decision.tolerant_merge,
            "quantized_weight": plan.weight.quantized,
            "round_trip_source": _round_trip_source(plan),
            "factored_source": factored.layer_source() if plan.decision.factored_dtype else "",
            "factored_dtype": plan.decision.factored_dtype,
            "factored_tolerance": factored.test_tolerance(plan.decision.factored_dtype),
            "quantization_backend": plan.decision.adds_quantization_backend(peft),
            "stored_in": plan.weight.stored_in.rpartition(".")[2] if peft.mode == PLUGIN else "",
            **_held_beside(plan, peft),
            "parameterless_target": plan.target.parameterless,
            "refused_options": {
                option: refusal_message(option, why) for option, why in strategy.refused_options.items()
            },
            "refusal_cases": _refusal_cases(plan, refusal, peft),
            "merges_lora_bias": merges_lora_bias,
            # A layer whose merge is always refused is never merged: it carries no code for a merged state.
            "never_merged": not strategy.merges and not plan.decision.tolerant_merge,
            # The bias as an attribute of the target the tests can set to None (not one of a child module).
            "bias_attribute": bias_attribute,
            # lora_bias on a base without a bias: one made so (its bias set to None), or one built without.
            "tests_lora_bias_without_base_bias": merges_lora_bias
            and peft.has_option("lora_bias")
            and bool(bias_attribute or not plan.weight.bias_name),
            "lora_bias_option": peft.has_option("lora_bias"),
            "dora_variant": dora_variant,
            "tests_dora": bool(dora_variant),
            "dora_unmerge_transposed": bool(dora_variant)
            and plan.decision.fan_in_fan_out
            and not peft.has(peft_release.DORA_UNMERGE_TRANSPOSES),
            "variant_support": assigned_string("VARIANT_SUPPORT = ", support),
            "dora_norm_dims": strategy.dora_norm_dims(plan.weight.shape, plan.decision.fan_in_fan_out),
            "api": peft.api,
            # A layer built alone with inference_mode: from the config (the config API, peft >= 0.19) or a keyword (0.18).
            "checks_inference_mode_alone": peft.api == "config" or peft.has(peft_release.SET_ADAPTER_INFERENCE_MODE),
            "inference_mode_in_config": peft.api == "config",
            # PEFT's set_scale recomputes rsLoRA's scaling where the layer keeps use_rslora in a dict of its own.
            "rslora_set_scale": peft.has(peft_release.USE_RSLORA_DICT),
            "tagged_variants": peft.has(peft_release.TAGGED_VARIANTS),
            "set_adapter_inference_mode": peft.has(peft_release.SET_ADAPTER_INFERENCE_MODE),
            "cast_input_dtype": peft.has(peft_release.CAST_INPUT_DTYPE),
            "device_hook": peft.has(peft_release.DEVICE_HOOK),
            # PEFT moves an adapter to the device and dtype of `weight` (or `qweight`): another one needs a word.
            "weight_name_differs": plan.weight.name != "weight",
            "base_has_children": bool(plan.target.children),
            # A layer that runs its base with W + dW stacks on another such layer of the module, for another weight
            # (`scan --generate` makes one a weight of a class with several, and its package stacks them).
            "stackable": strategy.stacks and peft.mode == PLUGIN,
            "param_wrapper": peft.mode == peft_release.PLUGIN and peft.has(peft_release.TARGET_PARAMETERS),
            "missing_dicts": _missing_dicts(peft),
            "peft_warning": peft.has(peft_release.PEFT_WARNING),
            "imports": format_imports(layer_imports(plan, peft, dora_variant)),
            "test_imports": format_imports(test_imports(plan, peft), first_party=("peft", plan.names.module_name)),
            "optional_target": "".join(f"{statement}\n" for statement in optional_imports(plan, peft)),
            "peft_builtin": plan.target.peft_builtin or "",
            # Laid out for the line the template puts them on: `    target = ` to fill parameters first, else `    return `.
            "ctor_call": layout(target_expression(plan), 4, make_target_head),
            "uninitialised": plan.target.uninitialised,
            **_captured_call(plan),
            "test_rank": plan.decision.test_rank,
            "eval_only": plan.decision.eval_only,
            "compared_modes": '("eval",)' if plan.decision.eval_only else '("train", "eval")',
            "settles": plan.decision.settles,
            "verify": False,
            "strategy_answers": dict(plan.decision.answers),
            # A weight a parametrization computes anew at each read leaves nothing stable to cache W + dW against.
            "weight_cache": strategy.caches_weight and not plan.weight.computed,
            "declares_fan_in_fan_out": strategy.declares_fan_in_fan_out,
        }
    )


def _captured_call(plan: LayerPlan) -> dict:
    """How the tests make the target's input: an expression, or the call the model makes to it (recorded again)."""
    call = plan.call.model_call
    if call is None:
        return {
            "model_call": False,
            "call_keywords": False,
            "inputs_expression": layout(_as_tuple(plan.call.example_input), 4, "return "),
            "captured_model": "",
            "captured_module": "",
            "model_input": "",
            "model_uninitialised": (),
        }
    return {
        "model_call": True,
        "call_keywords": bool(plan.call.keywords),
        "inputs_expression": "",
        "captured_model": layout(init_expression.aliased(call.model, plan.target.class_name), 4, "model = "),
        "captured_module": _literal(call.module),
        "model_input": layout(call.model_input, 4, "fed = "),
        "model_uninitialised": plan.call.model_uninitialised,
    }


def target_expression(plan: LayerPlan) -> str:
    """What builds the target in generated code: the --init expression or a call with the constructor arguments,
    naming the target class as generated code imports it."""
    if plan.target.init:
        return init_expression.aliased(plan.target.init, plan.target.class_name)
    arguments = ", ".join(f"{name}={source}" for name, source in plan.target.ctor_args)
    return f"{target_alias(plan.target.class_name)}({arguments})"


def render(plan: LayerPlan, peft: PeftRelease) -> tuple[GeneratedFile, ...]:
    return render_templates(layer_context(plan, peft))


def context_for_verify(
    plan: LayerPlan,
    peft: PeftRelease,
    *,
    layer_class: str,
    test_imports: str,
    refusals: list[tuple[str, str]],
    uses_dropout: bool,
    lora_bias: bool,
    dora: bool,
    mixed_batch: bool,
) -> LayerContext:
    """The test template's answers for a layer `verify` checks: the target's as `new` sees it, the layer's claims
    as `verify` found them, and no checks of a generated layer's own internals (its repr, the delta cache)."""
    return replace(
        layer_context(plan, peft),
        verify=True,
        plugin=True,
        layer_class=layer_class,
        test_imports=test_imports,
        weight_cache=False,
        stackable=False,  # stacking is what a generated layer adds for scan --generate's packages
        uses_dropout=uses_dropout,
        lora_bias_option=lora_bias,
        merges_lora_bias=lora_bias,
        tests_lora_bias_without_base_bias=False,  # its warning and error are a generated layer's own words
        tests_dora=dora,
        mixed_batch=mixed_batch,
        refusal_cases=refusal_entries([(options, "", case_id) for options, case_id in refusals]),
    )


def render_test_module(context: LayerContext) -> str:
    """The test template alone, for a layer lora-scaffold did not write."""
    name = "{{test_module}}.py" + TEMPLATE_SUFFIX
    return parsed(GeneratedFile(name, _environment(template_dir()).get_template(name).render(context.answers()))).text


def render_templates(context: LayerContext | dict, root: Path | None = None) -> tuple[GeneratedFile, ...]:
    """Every template under `root` rendered with `context` (a dict: answers as copier takes them)."""
    context = _answers(context)
    root = root or template_dir()
    environment = _environment(root)
    files = []
    for source in sorted(root.rglob(f"*{TEMPLATE_SUFFIX}")):
        relative = source.relative_to(root)
        if _excluded(relative, root):
            continue
        path = environment.from_string(relative.as_posix().removesuffix(TEMPLATE_SUFFIX)).render(context)
        files.append(parsed(GeneratedFile(path, environment.get_template(relative.as_posix()).render(context))))
    return tuple(files)


def _excluded(relative: Path, root: Path) -> bool:
    """What copier leaves out (its `_exclude` patterns, matched as copier does, against any part of the path)."""
    return any(fnmatch.fnmatch(part, pattern) for pattern in _exclude_patterns(root) for part in relative.parts)


@lru_cache(maxsize=4)
def _exclude_patterns(root: Path) -> tuple[str, ...]:
    return tuple(yaml.safe_load((root / "copier.yml").read_text(encoding="utf-8")).get("_exclude", ()))


def render_snippet(name: str, context: LayerContext | dict) -> str:
    """A piece of code that patch mode inserts into an existing file, or a file of a model's package: a layer's
    partial takes its LayerContext, the others (the pull request, the package's __init__) their own dict."""
    return _environment(template_dir()).get_template(name).render(_answers(context))


def _answers(context: LayerContext | dict) -> dict:
    return context.answers() if isinstance(context, LayerContext) else context


def parsed(generated: GeneratedFile) -> GeneratedFile:
    """Every rendered file must parse: one that does not is a bug, and is never written."""
    try:
        ast.parse(generated.text)
    except SyntaxError as exc:
        raise RenderError(
            f"lora-scaffold rendered {generated.path} that does not parse (line {exc.lineno}: {exc.msg}); "
            "nothing was written. This is a bug: please report it with the command you ran"
        ) from None
    return generated


def _environment(root: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _refusal_cases(plan: LayerPlan, dora_refused: str, peft: PeftRelease) -> tuple[str, ...]:
    """The parametrize entries (options, error text) the generated tests expect a ValueError for; PEFT's own layers
    (reuse) support them all. Only options the targeted peft's LoraConfig has."""
    if plan.decision.chosen.peft_own_layer:
        return ()
    cases = [('{"use_dora": True}', "no DoRA", "use_dora")] if dora_refused else []
    # Our message, not PEFT's ("Unknown initialization"): PEFT checks inits only for factors other than an embedding's.
    cases.append(('{"init_lora_weights": "pissa"}', "supports init_lora_weights", "pissa"))
    cases += [
        (f'{{"{option}": True}}', option, option)
        for option in plan.decision.chosen.refused_options
        if peft.has_option(option)
    ]
    return refusal_entries(cases)


def refusal_message(option: str, why: str) -> tuple[str, ...]:
    """The lines of the ValueError's message for a refused option, within the line length, `why` escaped."""
    start = 'f"lora.{type(self).__name__} does not support ' + option + "=True: "
    one_line = start + json.dumps(f"{why}.")[1:].replace("{", "{{").replace("}", "}}")
    return (one_line,) if len(one_line) + 16 <= LINE_LENGTH else (start + '"', *string_lines(f"{why}.", 16))


def refusal_entries(cases: list[tuple[str, str, str]]) -> tuple[str, ...]:
    """`pytest.param` entries of test_unsupported_options_raise from (options source, error text, id)."""
    return tuple(
        f"pytest.param({options}, {_literal(message)}, id={_literal(case_id)})" for options, message, case_id in cases
    )


def _missing_dicts(peft: PeftRelease) -> tuple[str, ...]:
    """Per-adapter dicts LoraLayer of that peft lacks, which the layer creates itself."""
    releases = {"use_rslora": peft_release.USE_RSLORA_DICT, "lora_bias": peft_release.LORA_BIAS}
    return tuple(name for name, release in releases.items() if not peft.has(release))


def _literal(text: str) -> str:
    """A double-quoted Python string literal (as ruff formats them) for any text."""
    return json.dumps(text)


def _as_tuple(expression: str) -> str:
    is_tuple = isinstance(ast.parse(expression, mode="eval").body, ast.Tuple)
    return expression if is_tuple else f"({expression},)"


def _held_beside(plan: LayerPlan, peft: PeftRelease) -> dict[str, str]:
    """The class `register` dispatches on where tensors beside the weight set the target apart (plugin mode)."""
    if peft.mode != PLUGIN or not plan.weight.held_beside:
        return {"held_beside": "", "held_beside_key": ""}
    names = plan.weight.held_beside  # identifiers: analysis keeps no other
    first = "".join(part.capitalize() for part in names[0].split("_"))
    return {
        "held_beside": "(" + ", ".join(f'"{name}"' for name in names) + ("," if len(names) == 1 else "") + ")",
        "held_beside_key": f"{plan.target.class_name}Holding{first}",
    }


def _round_trip_source(plan: LayerPlan) -> str:
    """The requantization function a quantized base merges through, as the layer module carries it."""
    name = dict(plan.decision.answers).get("round_trip", "")
    return round_trips.named(name).source() if name else ""
