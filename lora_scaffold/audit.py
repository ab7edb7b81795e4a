"""`audit MODEL [--layers DIR]`: LoRA on every module of the model PEFT's own layers or the generated ones adapt,
every adapter given random non-zero factors, then per module: which layer it was dispatched to, whether a change of
its adapter moves the model's output (an adapter a fused path skips is dead), whether its LoRA parameters get
gradients, and whether merging it leaves the model's output as it was. Plus the share of weight elements (tensors of
two or more dimensions) PEFT alone adapts, and PEFT with the generated layers."""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lora_scaffold import adapter_checks
from lora_scaffold.capture import check_runs, default_model_input, evaluate_model
from lora_scaffold.errors import USER_CODE_ERRORS, ScaffoldError
from lora_scaffold.generate import PACKAGE_RECORD
from lora_scaffold.peft_answer import peft_layer
from lora_scaffold.record import RECORD_DIR, GenerationRecord
from lora_scaffold.resolve import import_source, resolve_class
from lora_scaffold.scan import model_expression
from lora_scaffold.stored_weights import quantized_tensors
from lora_scaffold.strategies.beside import input_gradient_note


MERGE_TOLERANCE = 1e-4  # relative to the output's largest entry, in float32


@dataclass(frozen=True)
class ModuleAudit:
    name: str
    cls: str
    layer: str  # the LoRA layer it was dispatched to
    generated: bool  # one of the generated layers (else PEFT's own)
    live: bool  # a change of its adapter moves the model's output
    gradients: bool  # every LoRA parameter of it gets a non-zero gradient
    merge_error: float  # relative change of the model's output when it alone is merged
    tied_to: str = ""  # modules sharing its weight in the model (untied for the audit: merging writes into both)
    reached: bool = True  # the model's forward on the input calls it (an expert no token is routed to is not)
    # A layer over a quantized base: its merge "refused" or "requantized" (within the layer's own merge_tolerance
    # of dW, as it promises), and what is wrong with the gradient the base passes to its input ("" when nothing).
    quantized_merge: str = ""
    input_gradient: str = ""
    # The layer's own words where it refuses to merge, raising NotImplementedError and leaving the model as it was
    # (PEFT's lora.Conv2d over a grouped convolution): nothing is merged wrongly ("" when it merges).
    merge_refused: str = ""

    @property
    def merges(self) -> bool:
        return self.merge_error <= MERGE_TOLERANCE

    @property
    def passed(self) -> bool:
        """Live, trained and merged exactly (or refusing to, as a quantized base's layer promises); a module the
        input never reaches proves nothing either way."""
        merged = self.merges or bool(self.quantized_merge or self.merge_refused)
        return not self.reached or (self.live and self.gradients and merged)


@dataclass(frozen=True)
class Audit:
    model: str
    modules: tuple[ModuleAudit, ...]
    weight_elements: int  # elements of every parameter of two or more dimensions
    peft_elements: int  # of those, adapted by PEFT's own layers
    generated_elements: int  # adapted by the generated layers

    @property
    def dead(self) -> tuple[ModuleAudit, ...]:
        return tuple(m for m in self.modules if m.reached and not m.live)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.modules)


@dataclass(frozen=True)
class GeneratedLayer:
    target: type
    weight: str  # the weight it adapts, relative to the target
    register: object


def load_layers(folder: Path) -> tuple[GeneratedLayer, ...]:
    """The layers `new -o` or `scan --generate` wrote into `folder`, through their generation records; registered
    through the folder's package where `scan --generate` made one (it stacks the layers of a class with several)."""
    records = sorted((folder / RECORD_DIR).glob("lora_*.json"))
    if not records:
        raise ScaffoldError(f"--layers {folder}: no generated layer there (no {RECORD_DIR}/lora_*.json)")
    package = _generated_package(folder)
    layers = []
    for path in records:
        record = GenerationRecord.from_json(path.read_text(encoding="utf-8"), str(path))
        if package is None:
            resolve_class(f"{folder / record.module_name}.py:{record.layer_class}", "layer")  # imports its module
            module = sys.modules[record.module_name]
        else:
            module = _import(f"{package.__name__}.{record.module_name}", folder)
        (target,) = _registered(module.register)  # a generated module registers its one target
        weight = getattr(module, "WEIGHT_NAME", None) or record.request.weight or "weight"  # reuse: PEFT's "weight"
        layers.append(GeneratedLayer(target, weight, package.register if package else module.register))
    if package is None:
        _refuse_unstacked(folder, layers)
    return tuple(layers)


def _generated_package(folder: Path):
    """The package `scan --generate` wrote into `folder`, imported under the folder's name (None for `new -o`'s)."""
    if not (folder / PACKAGE_RECORD).is_file() or not (folder / "__init__.py").is_file():
        return None
    return import_source(folder.resolve().name, folder / "__init__.py", package=True)


def _import(name: str, folder: Path):
    try:
        return importlib.import_module(name)
    except USER_CODE_ERRORS as exc:
        raise ScaffoldError(f"--layers {folder}: {name} does not import: {type(exc).__name__}: {exc}") from None


def _refuse_unstacked(folder: Path, layers: list[GeneratedLayer]) -> None:
    """Each layer's own register makes its class dispatch to it alone: two layers of one class would hide one."""
    seen: dict[type, str] = {}
    for layer in layers:
        if layer.target in seen:
            raise ScaffoldError(
                f"--layers {folder}: two layers adapt {layer.target.__name__} ({seen[layer.target]} and "
                f"{layer.weight}), and a module takes one through its layer's register; `scan --generate` writes "
                "a package that stacks them"
            )
        seen[layer.target] = layer.weight


def _registered(register) -> dict:
    from peft import LoraConfig

    return dict(register(LoraConfig(target_modules=["none"]))._custom_modules)


def audit(model: str, layers: tuple[GeneratedLayer, ...] = (), model_input: str | None = None) -> Audit:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    expression = model_expression(model)
    built = evaluate_model(expression).eval()
    if hasattr(getattr(built, "config", None), "use_cache"):
        built.config.use_cache = False  # one forward after another, as in training
    model_input = model_input or default_model_input(built)
    check_runs(built, model_input)
    ours = tuple(layer.target for layer in layers)
    ties = _ties(built)
    _untie(built)  # each module's merge is checked on its own, not through the weight a tied head shares
    peft_targets, our_targets = _targets(built, ours)
    # A module whose weight a generated layer adapts through its parent (wav2vec2's weight-normed conv) is that
    # layer's: PEFT's own layer on it too would stack two adapters on one weight.
    weights_of = _weights_of(layers)
    owned = {
        f"{name}.{weight.rpartition('.')[0]}"
        for name in our_targets
        for weight in weights_of.get(type(built.get_submodule(name)), ())
        if "." in weight
    }
    dispatched_by_peft, peft_targets = peft_targets, [name for name in peft_targets if name not in owned]
    # PEFT's own first, then ours: a generated layer may wrap a module whose children PEFT's adapt (a Mamba mixer
    # and its projections), and wrapping the parent first would leave the children's adapters outside the model.
    with warnings.catch_warnings(), _without_moe_conversion(built):
        warnings.simplefilter("ignore")
        if peft_targets:
            inject_adapter_in_model(LoraConfig(target_modules=peft_targets, r=2, lora_alpha=2), built)
        if our_targets:
            config = LoraConfig(target_modules=our_targets, r=2, lora_alpha=2)
            for layer in layers:
                config = layer.register(config)
            inject_adapter_in_model(config, built)
    # Named as in the model: a module inside a generated layer's base module is the model's `mixer.dt_proj` still.
    adapted = {
        _audit_name(name, module, LoraLayer): module
        for name, module in built.named_modules()
        if isinstance(module, LoraLayer)
    }
    adapter_checks.randomise(adapted.values())
    run = adapter_checks.runner(built, model_input)
    reached = adapter_checks.reached(built, adapted, model_input)
    gradients = adapter_checks.gradients(built, adapted, model_input)
    modules = []
    for name, module in adapted.items():
        reference = run()  # anew each time: a forward may leave state behind (PEFT's MultiheadAttention does)
        live = adapter_checks.live(module, run, reference)
        ours_quantized = hasattr(module, "dequantized_linear")  # a generated `beside` layer
        base = module.get_base_layer()
        # PEFT's own layer over a quantized base may refuse too (its torchao layer, without the model's TorchAoConfig)
        quantized = ours_quantized or bool(quantized_tensors(base))
        refused = quantized and _merge_refused(module)
        merging = _merged_with(name, module, adapted)
        merge_error, merge_refused = (math.inf, "") if refused else adapter_checks.merge_error(merging, run, run())
        # Requantized within its own tolerance, as a generated layer promises; PEFT's layers are measured as they are.
        quantized_merge = "refused" if refused else "requantized" if ours_quantized else ""
        modules.append(
            ModuleAudit(
                name,
                type(base).__name__,
                type(module).__name__,
                isinstance(base, ours),
                live,
                gradients[name],
                merge_error,
                ", ".join(sorted(ties.get(name, ()))),
                name in reached,
                quantized_merge,
                input_gradient_note(base, module.in_features) if quantized else "",
                merge_refused,
            )
        )
    total, by_peft, by_ours = _coverage(evaluate_model(expression), dispatched_by_peft, our_targets, layers)
    return Audit(expression, tuple(modules), total, by_peft, by_ours)


def _audit_name(name: str, layer, lora_layer: type) -> str:
    """The module's name in the model (a module inside a generated layer's base is the model's `mixer.dt_proj`
    still); for one of the layers stacked on a module, one a weight, the name of the weight it adapts."""
    where = re.sub(r"(\.base_layer)+(?=\.|$)", "", name)
    stacked = isinstance(layer.base_layer, lora_layer) or name.endswith(".base_layer")
    return f"{where}.{getattr(sys.modules[type(layer).__module__], 'WEIGHT_NAME', 'weight')}" if stacked else where


def _weights_of(layers: tuple[GeneratedLayer, ...]) -> dict[type, list[str]]:
    weights: dict[type, list[str]] = {}
    for layer in layers:
        weights.setdefault(layer.target, []).append(layer.weight)
    return weights


def _merged_with(name: str, layer, adapted: dict):
    """The layer whose merge merges this one: PEFT's lora.MultiheadAttention merges and unmerges the lora.Linear on
    its `out_proj` itself, in each forward too, so that adapter merged alone says nothing of what PEFT does."""
    from peft.tuners.lora.layer import MultiheadAttention

    parent = adapted.get(name.rpartition(".")[0])
    return parent if name.endswith(".out_proj") and isinstance(parent, MultiheadAttention) else layer


def _merge_refused(layer) -> bool:
    """Whether a quantized base's layer refuses to merge its adapter, raising (a generated layer: the loss is above
    its tolerance; PEFT's torchao layer: no requantization known)."""
    try:
        layer.merge()
    except USER_CODE_ERRORS as exc:
        return "cannot merge" in str(exc) or not hasattr(layer, "dequantized_linear")
    layer.unmerge()
    return False


@contextlib.contextmanager
def _without_moe_conversion(model: nn.Module):
    """PEFT rewrites a config for transformers-v5 MoE models: names of shared-expert projections (`gate_proj`) also
    target the routed experts' stacked parameters (ParamWrapper), which then clash with a generated experts layer.
    The audit asks for PEFT's own layer on each module it names, so PEFT does not see the model's type meanwhile."""
    config = getattr(model, "config", None)
    if config is not None:
        model.config = None
    try:
        yield
    finally:
        if config is not None:
            model.config = config


def _ties(model: nn.Module) -> dict[str, set[str]]:
    """For each module holding a weight another module holds too (a head tied to the embedding), those others."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None and parameter.dim() >= 2:
                owners.setdefault(id(parameter), set()).add(name)
    return {name: names - {name} for names in owners.values() if len(names) > 1 for name in names}


def _untie(model: nn.Module) -> None:
    seen: set[int] = set()
    for module in model.modules():
        for key, parameter in module._parameters.items():
            if parameter is not None and id(parameter) in seen:
                module._parameters[key] = nn.Parameter(parameter.detach().clone(), parameter.requires_grad)
            elif parameter is not None:
                seen.add(id(parameter))


def _targets(model: nn.Module, ours: tuple[type, ...]) -> tuple[list[str], list[str]]:
    """(full names of modules PEFT's own layers adapt, full names of modules the generated layers adapt)."""
    peft, generated = [], []
    for name, module in model.named_modules():
        if not name or ".parametrizations." in f".{name}.":
            continue
        if isinstance(module, ours):
            generated.append(name)
        elif isinstance(module, nn.MultiheadAttention) or _inside_attention(model, name):
            peft += [name] if isinstance(module, nn.MultiheadAttention) else []  # PEFT's wraps its out_proj too
        elif _peft_own(peft_layer(module, name, model)):
            peft.append(name)
    return peft, generated


def _peft_own(answer: str) -> bool:
    """PEFT builds one of its own layers for the module (not a ParamWrapper on its parameters, not a refusal)."""
    return answer.startswith("lora.") and "ParamWrapper" not in answer


def _inside_attention(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def _coverage(model: nn.Module, peft_targets, our_targets, layers) -> tuple[int, int, int]:
    """Elements of the parameters of two or more dimensions: all, PEFT's own layers' weights, the generated layers'.
    Each tensor once (a tied embedding and head are one)."""
    weights = {id(p): p.numel() for p in model.parameters() if p.dim() >= 2}
    by_peft = {id(p) for name in peft_targets for p in model.get_submodule(name).parameters() if p.dim() >= 2}
    weights_of = _weights_of(layers)
    by_ours = {
        id(p)
        for name in our_targets
        for weight in weights_of.get(type(model.get_submodule(name)), ())
        for p in _weights(model.get_submodule(name), weight)
    } - by_peft
    return (
        sum(weights.values()),
        sum(weights.get(key, 0) for key in by_peft),
        sum(weights.get(key, 0) for key in by_ours),
    )


def _weights(module: nn.Module, name: str) -> list:
    """The parameter a weight name stands for; for a parametrized weight, the originals it is computed from."""
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attribute in owner._parameters:
        return [owner._parameters[attribute]]
    originals = getattr(getattr(owner, "parametrizations", None), attribute, None)
    return list(originals.parameters()) if originals is not None else []
