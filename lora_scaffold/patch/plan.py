"""What patch mode adds to a checkout, as whole-file texts: the inverse of each edit is what `remove` applies."""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold.analyse import LayerPlan
from lora_scaffold.patch.battery import BATTERY_FILE, BatteryEntry, add_battery_entry, remove_battery_entry
from lora_scaffold.patch.checkout import LORA_PACKAGE, PeftCheckout, safe_path
from lora_scaffold.patch.cst_utils import PatchError
from lora_scaffold.patch.dispatch import LAYER_FILE, DispatchBranch, insert_branch, read_chain, remove_branch
from lora_scaffold.patch.exports import INIT_FILE, add_export, remove_export
from lora_scaffold.patch.imports import add_import, remove_import_if_unused
from lora_scaffold.peft_api import has_lora_variants, parse_version
from lora_scaffold.render import PATCH, GeneratedFile, dora_blocker_for, render, render_snippet, template_context


EDITED_FILES = frozenset({LAYER_FILE, INIT_FILE, BATTERY_FILE})


@dataclass(frozen=True)
class CheckoutPatch:
    layer_path: str
    test_path: str
    generated: tuple[GeneratedFile, ...]
    branch: DispatchBranch
    needs_sys: bool
    battery: BatteryEntry | None
    module_name: str
    layer_class: str

    @property
    def new_files(self) -> tuple[str, ...]:
        return (self.layer_path, self.test_path)


def build_patch(plan: LayerPlan, target_cls: type, checkout: PeftCheckout) -> CheckoutPatch:
    lora_variants = has_lora_variants(parse_version(checkout.version))
    layer_file, test_file = render(plan, PATCH, checkout.call_form, lora_variants)
    layer_path = f"{LORA_PACKAGE}/{layer_file.path}"
    test_path = f"tests/{test_file.path}"
    return CheckoutPatch(
        layer_path=layer_path,
        test_path=test_path,
        generated=(GeneratedFile(layer_path, layer_file.text), GeneratedFile(test_path, test_file.text)),
        branch=dispatch_branch(plan, target_cls, checkout),
        needs_sys=not plan.target_in_torch,
        battery=None if plan.battery_blocker else battery_entry(plan, lora_variants),
        module_name=plan.module_name,
        layer_class=plan.layer_class,
    )


def dispatch_branch(plan: LayerPlan, target_cls: type, checkout: PeftCheckout) -> DispatchBranch:
    if plan.target_in_torch:
        test = f"isinstance(target_base_layer, {plan.target_module}.{plan.target_class})"
        comment = ""
    else:
        test = (
            f'isinstance(target_base_layer, getattr(sys.modules.get("{plan.target_module}"), '
            f'"{plan.target_class}", ()))'
        )
        comment = f"# Looked up in sys.modules: peft never imports {plan.target_module}, which may not be installed.\n"
    arguments = "config=config, **kwargs" if checkout.call_form == "config" else "**kwargs"
    body = (
        f"{comment}from .{plan.module_name} import {plan.layer_class}\n\n"
        f"new_module = {plan.layer_class}(target, adapter_name, {arguments})"
    )
    source = checkout.source(LAYER_FILE)
    chain = read_chain(source)
    base_spellings = frozenset(
        spelling
        for spelling in chain.branch_types()
        if spelling and _is_base_class(_resolve_spelling(spelling, source), target_cls)
    )
    return DispatchBranch(test, body, base_spellings)


def battery_entry(plan: LayerPlan, lora_variants: bool) -> BatteryEntry:
    model_id = plan.layer_class
    model_class = f"Model{plan.layer_class}"
    context = template_context(plan, PATCH)
    context.update(
        battery_class=model_class,
        battery_ctor=f"{_battery_target(plan)}({', '.join(f'{n}={v}' for n, v in plan.ctor_args)})",
        battery_input_layers=[f"self.lin_in{i} = nn.Linear(10, {math.prod(x.shape)})" for i, x in _floats(plan)],
        battery_inputs=_tuple_code(_input_expressions(plan), indent=8, prefix="inputs = "),
        output_features=plan.output_features,
        output_is_tuple=plan.output_is_tuple,
    )
    class_code = render_snippet("partials/battery_model.py.jinja", context)
    # Only options the layer implements: PEFT's battery would pass a layer that ignored the others.
    cases = [("1 LoRA", '{"target_modules": ["target"]}'), ("2 LoRA", '{"target_modules": ["target", "lin0"]}')]
    cases.append(("3 LoRA rsLoRA", '{"target_modules": ["target"], "use_rslora": True, "lora_alpha": 16}'))
    if plan.strategy != "embedding":
        cases.append(("4 LoRA dropout", '{"target_modules": ["target"], "lora_dropout": 0.1}'))
    if plan.bias_name:
        cases.append(("5 LoRA lora_bias", '{"target_modules": ["target"], "lora_bias": True}'))
    if not dora_blocker_for(plan, lora_variants):
        cases.append(("6 LoRA DoRA", '{"target_modules": ["target"], "use_dora": True}'))
    test_cases = tuple(_case_code(f"{model_id} {label} (lora-scaffold)", model_id, kwargs) for label, kwargs in cases)
    return BatteryEntry(model_id, model_class, class_code, test_cases)


def _case_code(name: str, model_id: str, kwargs: str) -> str:
    one_line = f'("{name}", "{model_id}", LoraConfig, {kwargs})'
    if len(one_line) + len("    ,") <= 119:
        return one_line
    return f'(\n        "{name}",\n        "{model_id}",\n        LoraConfig,\n        {kwargs},\n    )'


def _tuple_code(items: list[str], indent: int, prefix: str) -> str:
    """A tuple laid out as ruff formats it: on one line when it fits, else one item a line."""
    one_line = f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if indent + len(prefix) + len(one_line) <= 119:
        return one_line
    inner = " " * (indent + 4)
    return "(\n" + "".join(f"{inner}{item},\n" for item in items) + " " * indent + ")"


def _battery_target(plan: LayerPlan) -> str:
    return f"{plan.target_module}.{plan.target_class}" if plan.target_in_torch else plan.target_class


def _floats(plan: LayerPlan):
    return [(i, x) for i, x in enumerate(plan.inputs) if x.floating]


def _input_expressions(plan: LayerPlan) -> list[str]:
    """PEFT's battery feeds every model `torch.arange(90).view(9, 10)`: shape that into the target's inputs."""
    expressions = []
    for index, info in enumerate(plan.inputs):
        shape = ", ".join(map(str, info.shape))
        if info.floating:
            expressions.append(f"self.lin_in{index}(X.to(self.dtype)).reshape(-1, {shape})")
        else:
            size = math.prod(info.shape)
            repeats = max(1, math.ceil(size / 10))
            expressions.append(f"(X.long().repeat(1, {repeats})[:, :{size}] % {info.high}).reshape(-1, {shape})")
    return expressions


def _resolve_spelling(spelling: str, layer_source: str):
    """The class a branch's type spelling names in layer.py (`torch.nn.Conv2d`, `nn.Conv1d`, `Conv1D`), or None.

    Only modules already imported are looked in: a class from a module nobody imported cannot be a base class of
    the target (which is imported), and importing transformers just to find out would take seconds."""
    bindings: dict[str, tuple[str, str | None]] = {}
    for node in ast.parse(layer_source).body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                bindings[bound] = (alias.name if alias.asname else alias.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                bindings[alias.asname or alias.name] = (node.module, alias.name)
    head, *rest = spelling.split(".")
    if head not in bindings:
        return None
    module_name, attribute = bindings[head]
    value = sys.modules.get(module_name)
    for name in ([attribute] if attribute else []) + rest:
        value = getattr(value, name, None)
    return value


def _is_base_class(candidate, target_cls: type) -> bool:
    return isinstance(candidate, type) and issubclass(target_cls, candidate)


def patched_sources(checkout: PeftCheckout, patch: CheckoutPatch) -> tuple[GeneratedFile, ...]:
    layer = checkout.source(LAYER_FILE)
    if patch.needs_sys:
        layer = add_import(layer, "sys", LAYER_FILE)
    edited = (
        GeneratedFile(LAYER_FILE, insert_branch(layer, patch.branch)),
        GeneratedFile(INIT_FILE, add_export(checkout.source(INIT_FILE), patch.module_name, patch.layer_class)),
    )
    if patch.battery is not None:
        edited += (GeneratedFile(BATTERY_FILE, add_battery_entry(checkout.source(BATTERY_FILE), patch.battery)),)
    return patch.generated + edited


def unpatched_sources(checkout: PeftCheckout, patch: CheckoutPatch, force: bool) -> tuple[GeneratedFile, ...]:
    layer = remove_branch(checkout.source(LAYER_FILE), patch.branch, force)
    if patch.needs_sys:
        layer = remove_import_if_unused(layer, "sys", LAYER_FILE)
    edited = (
        GeneratedFile(LAYER_FILE, layer),
        GeneratedFile(INIT_FILE, remove_export(checkout.source(INIT_FILE), patch.module_name, patch.layer_class)),
    )
    if patch.battery is not None:
        battery = remove_battery_entry(checkout.source(BATTERY_FILE), patch.battery, force)
        edited += (GeneratedFile(BATTERY_FILE, battery),)
    return edited


def refuse_foreign_layer(checkout: PeftCheckout, patch: CheckoutPatch, target_spec: str) -> None:
    """A layer module of the same name made for another class is an error, whatever --force says."""
    path = safe_path(checkout.root, patch.layer_path)
    if path.is_file():
        text = path.read_bytes().decode("utf-8")
        marker = f'"""LoRA layer for `{target_spec}`.'
        if marker not in text:
            raise PatchError(
                f"{patch.layer_path} already exists and is not lora-scaffold's layer for {target_spec}; "
                "pick another name with --name"
            )


def edited_by_user(checkout: PeftCheckout, patch: CheckoutPatch) -> list[str]:
    """Generated files in the checkout whose text is no longer what `new` wrote."""
    edited = []
    for generated in patch.generated:
        path = safe_path(checkout.root, generated.path)
        if path.is_file() and path.read_bytes().decode("utf-8") != generated.text:
            edited.append(generated.path)
    return edited


def checkout_path(checkout: PeftCheckout, relative: str) -> Path:
    return safe_path(checkout.root, relative)
