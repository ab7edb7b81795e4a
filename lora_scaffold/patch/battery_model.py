"""The small model and TEST_CASES entries through which PEFT's own test battery runs on a generated layer."""

from __future__ import annotations

import ast
import math
from dataclasses import replace

from lora_scaffold.generated_imports import optional_imports, split_imports
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.layout import layout
from lora_scaffold.patch.battery import BatteryEntry
from lora_scaffold.peft_release import PeftRelease
from lora_scaffold.render import dora_refusal, layer_context, render_snippet, target_expression


def battery_entry(plan: LayerPlan, peft: PeftRelease) -> BatteryEntry:
    model_id = plan.names.layer_class
    model_class = f"Model{plan.names.layer_class}"
    context = replace(
        layer_context(plan, peft),
        battery_class=model_class,
        battery_imports=_imports(plan, peft),
        battery_ctor=layout(target_expression(plan), 8, "self.target = "),
        battery_input_layers=tuple(f"self.lin_in{i} = nn.Linear(10, {math.prod(x.shape)})" for i, x in _floats(plan)),
        battery_inputs=layout(_tuple(_input_expressions(plan)), 8, "inputs = "),
        output_features=plan.call.output_features,
        output_is_tuple=plan.call.output_is_tuple,
    )
    class_code = render_snippet("partials/battery_model.py.jinja", context)
    # Named as PEFT names its cases: the layer type and the option ("Conv2d 1 LoRA with DoRA"), not the tool.
    test_cases = tuple(
        _case_code(f"{plan.target.class_name} {label}", model_id, kwargs) for label, kwargs in _cases(plan, peft)
    )
    return BatteryEntry(model_id, model_class, class_code, test_cases)


def _cases(plan: LayerPlan, peft: PeftRelease) -> list[tuple[str, str]]:
    """Only options the layer implements: PEFT's battery would pass a layer that ignored the others."""
    cases = [("1 LoRA", '{"target_modules": ["target"]}'), ("2 LoRA", '{"target_modules": ["target", "lin0"]}')]
    cases.append(("3 LoRA with rslora", '{"target_modules": ["target"], "use_rslora": True, "lora_alpha": 16}'))
    if plan.decision.chosen.uses_dropout:
        cases.append(("4 LoRA with dropout", '{"target_modules": ["target"], "lora_dropout": 0.1}'))
    if plan.weight.bias_name and peft.has_option("lora_bias"):
        cases.append(("5 LoRA with lora_b bias", '{"target_modules": ["target"], "lora_bias": True}'))
    if not dora_refusal(plan, peft):
        cases.append(("6 LoRA with DoRA", '{"target_modules": ["target"], "use_dora": True}'))
    return cases


def _case_code(name: str, model_id: str, kwargs: str) -> str:
    one_line = f'("{name}", "{model_id}", LoraConfig, {kwargs})'
    if len(one_line) + len("    ,") <= 119:
        return one_line
    return f'(\n        "{name}",\n        "{model_id}",\n        LoraConfig,\n        {kwargs},\n    )'


def _tuple(items: list[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _imports(plan: LayerPlan, peft: PeftRelease) -> tuple[str, ...]:
    """What the model's constructor imports of what building the target names (test_custom_models.py has torch
    and nn): from torch as usual, from other packages through importorskip, so that the battery skips without
    them."""
    used = {
        node.id for node in ast.walk(ast.parse(target_expression(plan), mode="eval")) if isinstance(node, ast.Name)
    }
    sure, _ = split_imports(plan, peft)
    statements = []
    for module, names in sure:
        wanted = [name for name in names if name.rpartition(" as ")[2] in used]
        if wanted:
            statements.append(f"from {module} import {', '.join(wanted)}")
        elif not names and module in used:
            statements.append(f"import {module}")
    optional = [statement for statement in optional_imports(plan, peft) if statement.partition(" = ")[0] in used]
    # ruff format separates imports from the statements after them by a blank line, in a function too.
    return (*dict.fromkeys(statements), *[""] * bool(statements), *dict.fromkeys(optional))


def _floats(plan: LayerPlan):
    return [(i, x) for i, x in enumerate(plan.call.inputs) if x.floating]


def _input_expressions(plan: LayerPlan) -> list[str]:
    """PEFT's battery feeds every model `torch.arange(90).view(9, 10)`: shape that into the target's inputs."""
    expressions = []
    for index, info in enumerate(plan.call.inputs):
        shape = ", ".join(map(str, info.shape))
        if info.floating:
            expressions.append(f"self.lin_in{index}(X.to(self.dtype)).reshape(-1, {shape})")
        else:
            size = math.prod(info.shape)
            repeats = max(1, math.ceil(size / 10))
            expressions.append(f"(X.long().repeat(1, {repeats})[:, :{size}] % {info.high}).reshape(-1, {shape})")
    return expressions
