"""What generated code imports: the layer module's imports, the test module's, and the target's (sure to import, or
bound through `pytest.importorskip` inside a peft checkout, where only torch is sure to be installed)."""

from __future__ import annotations

from lora_scaffold import peft_release
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.names import target_alias
from lora_scaffold.peft_release import CONFIG_API, KWARGS_API, PLUGIN, PeftRelease


def layer_imports(plan: LayerPlan, peft: PeftRelease, dora_variant: str) -> list[tuple[str, tuple[str, ...]]]:
    plugin = peft.mode == PLUGIN
    # Inside the peft package, imports are relative, as PEFT's own backends do (`from peft import` would be circular).
    package = "peft.tuners.lora." if plugin else "."
    target = [target_import(plan)] if plugin else []
    # LoraConfig is read by the config API and typed in plugin mode's register().
    config = [("peft" if plugin else f"{package}config", ("LoraConfig",))]
    # register() leaves single parameters to PEFT's ParamWrapper (`target_parameters`).
    param_wrapper = (
        [(f"{package}layer", ("ParamWrapper",))] if plugin and peft.has(peft_release.TARGET_PARAMETERS) else []
    )
    if plan.decision.chosen.peft_own_layer:
        typing = [("typing", ("Optional",)), ("torch", ("nn",))] if param_wrapper else []
        return (
            target
            + [(f"{package}layer", (plan.target.peft_builtin,))]
            + param_wrapper
            + typing
            + (config if plugin else [])
        )
    imports = [
        ("__future__", ("annotations",)),
        ("math", ()),
        ("warnings", ()),
        ("typing", ("Any", "Optional")),
        ("torch", ()),
        ("torch", ("nn",)),
        ("peft.tuners.tuners_utils", ("check_adapters_to_merge",)),
        ("peft.utils.integrations", ("gather_params_ctx",)),
        (f"{package}layer", ("LoraLayer",)),
        *target,
        *(config if peft.api == CONFIG_API or plugin else []),
        *plan.decision.chosen.imports(dict(plan.decision.answers)),
        *(
            [("torch.overrides", ("TorchFunctionMode",)), ("torch.nn.functional as F", ())]
            if plan.decision.factored_dtype
            else []
        ),
        *param_wrapper,
    ]
    if peft.has(peft_release.PEFT_WARNING):
        imports.append(("peft.utils.warning", ("PeftWarning",)))
    if plugin and plan.weight.stored_in:
        imports.append(stored_in_import(plan))
    if plan.decision.adds_quantization_backend(peft):
        imports.append(("peft.utils.quantization_utils", ("QuantizationBackend",)))
    if plan.weight.computed:
        imports.append(("torch.nn.utils", ("parametrize",)))
    if peft.api == KWARGS_API:
        imports.append(("types", ("SimpleNamespace",)))
    if dora_variant:
        imports.append((f"{package}variants", (dora_variant,)))
    return imports


def test_imports(
    plan: LayerPlan, peft: PeftRelease, layer_import: tuple[str, tuple[str, ...]] | None = None
) -> list[tuple[str, tuple[str, ...]]]:
    """The test module's imports; `layer_import` (verify) brings in another layer class than the generated one."""
    imports = [
        ("inspect", ()),
        ("math", ()),
        ("pytest", ()),
        ("torch", ()),
        ("torch", ("nn",)),
        ("warnings", ()),
        ("peft", ("LoraConfig", "PeftModel", "get_peft_model")),
    ]
    if layer_import is not None:
        imports.append(layer_import)
    elif peft.mode == PLUGIN:
        imports.append((plan.names.module_name, (plan.names.layer_class, "register")))
    else:
        imports.append((f"peft.tuners.lora.{plan.names.module_name}", (plan.names.layer_class,)))
    if plan.call.model_call is not None:
        imports += [("contextlib", ()), ("copy", ()), ("functools", ())]
    sure, _ = split_imports(plan, peft)
    return imports + sure


def target_import(plan: LayerPlan) -> tuple[str, tuple[str, ...]]:
    alias = target_alias(plan.target.class_name)
    name = plan.target.class_name if alias == plan.target.class_name else f"{plan.target.class_name} as {alias}"
    return plan.target.module, (name,)


def stored_in_import(plan: LayerPlan) -> tuple[str, tuple[str, ...]]:
    """The tensor subclass `register` dispatches on (torchao's Int8Tensor for a quantized nn.Linear)."""
    module, _, name = plan.weight.stored_in.rpartition(".")
    return module, (name,)


def optional_imports(plan: LayerPlan, peft: PeftRelease) -> list[str]:
    """Statements binding, through `pytest.importorskip`, what the tests import from packages peft may lack."""
    _, optional = split_imports(plan, peft)
    statements = []
    for module, names in optional:
        if not names:
            statements.append(f'{module} = pytest.importorskip("{module}")')
        for name in names:
            bound, _, imported = name.partition(" as ")
            statements.append(f'{imported or bound} = pytest.importorskip("{module}").{bound}')
    return list(dict.fromkeys(statements))


def split_imports(
    plan: LayerPlan, peft: PeftRelease
) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, tuple[str, ...]]]]:
    """The target's and --init's imports, as (sure to import, maybe missing): plugin output imports its target;
    inside peft only torch is sure to be installed, and a test of a class from elsewhere skips without it."""
    wanted = [target_import(plan), *plan.target.init_imports]
    if peft.mode == PLUGIN:
        return wanted, []
    in_torch = [entry for entry in wanted if entry[0].split(".")[0] == "torch"]
    return in_torch, [entry for entry in wanted if entry not in in_torch]
