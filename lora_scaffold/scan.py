"""`scan`: which module classes of a model hold weights, what PEFT's LoRA does with each (asked of PEFT), and the
`new --from-model` command for the others. The model is built on the meta device where it can be (no weights are
allocated), for real on the CPU where it cannot (a quantized layer copies data in its constructor)."""

from __future__ import annotations

import ast
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from lora_scaffold.adapter_checks import read_without_call
from lora_scaffold.capture import built_model, default_model_input, model_input_choices
from lora_scaffold.errors import USER_CODE_ERRORS, AnalysisError, ScaffoldError, TargetError
from lora_scaffold.init_expression import ModuleNamespace
from lora_scaffold.peft_answer import peft_layer
from lora_scaffold.request import ModelCall
from lora_scaffold.resolve import resolve_callable
from lora_scaffold.stored_weights import quantized_tensors, storage
from lora_scaffold.strategies import peft_builtin, peft_layer_unchanged


ROOT = "(the model)"  # how the model itself is listed among its modules


@dataclass(frozen=True)
class Variant:
    """Instances of a class that hold weights of the same shapes."""

    instances: tuple[str, ...]
    weights: tuple[tuple[str, tuple[int, ...]], ...]  # what the module uses: a parametrized weight, not its pieces


@dataclass(frozen=True)
class ScannedClass:
    qualified_name: str
    instances: int
    example: str  # the name of the instance the command targets
    weights: tuple[tuple[str, tuple[int, ...]], ...]  # of that instance
    variants: tuple[Variant, ...]  # one per set of weight shapes
    handled_by: str  # what PEFT does with the class, asked of PEFT ("" when it refuses it)
    command: str  # the `new` command for a class PEFT does not handle ("" otherwise)
    why_not: str  # why there is no command ("" when there is one, or PEFT handles the class)
    module: str = ""  # the submodule the command targets (a parametrized module's parent)
    weight: str = ""  # the weight the command adapts
    storage: str = ""  # how its instances keep their weights, where not as plain floats ("weight stored as int8")
    # The class's other weights LoRA could adapt, which the command's layer leaves (a layer adapts one weight)
    unadapted: tuple[str, ...] = ()


def is_expression(model: str) -> bool:
    try:
        ast.parse(model.strip(), mode="eval")
    except SyntaxError:
        return False
    return ":" not in model or "(" in model


def model_expression(model: str) -> str:
    """MODEL as generated code builds it: the expression, or `stem.function()` for path/file.py:function (whose
    folder goes on sys.path, as for a file target)."""
    if is_expression(model):
        return model.strip()
    resolve_callable(model)
    path, _, function = model.rpartition(":")
    return f"{Path(path).stem}.{function}()"


def build_model(model: str) -> nn.Module:
    """MODEL on the meta device where it builds there, else for real (on the CPU, small)."""
    expression = model_expression(model)
    try:
        with torch.device("meta"):
            built = eval(expression, ModuleNamespace(torch=torch, nn=nn))  # noqa: S307 - the user's own expression
    except USER_CODE_ERRORS:
        built = built_model(expression)
    if not isinstance(built, nn.Module):
        raise TargetError(f"{model!r} gives a {type(built).__name__}, not an nn.Module")
    return built


def from_model(model: str, module_name: str, model_input: str | None = None) -> tuple[str, str, ModelCall]:
    """(target, --init expression, the model's call to the submodule) for one submodule of MODEL."""
    expression = model_expression(model)
    built = built_model(expression)
    try:
        submodule = built.get_submodule(module_name)
    except AttributeError:
        raise TargetError(f"{model!r} has no submodule {module_name!r}; `lora-scaffold scan` lists them") from None
    cls = type(submodule)
    if parametrize.is_parametrized(submodule) and cls.__module__ == parametrize.__name__:
        parent, _, leaf = module_name.rpartition(".")
        weights = ", ".join(f"{leaf}.{name}" for name in submodule.parametrizations)
        raise TargetError(
            f"{module_name} is a {cls.__bases__[0].__name__} whose {weights.replace(leaf + '.', '')} a parametrization "
            f"computes, and torch generates its class: target its parent, --module {parent or '(the model)'} "
            f"--weight {weights.split(', ')[0]}"
        )
    if "." in cls.__qualname__ or cls.__module__ == "__main__":
        raise TargetError(
            f"{cls.__qualname__} cannot be imported by generated code (defined in a function or __main__)"
        )
    call = ModelCall(expression, module_name, model_input or default_model_input(built))
    return f"{cls.__module__}.{cls.__name__}", f"({expression}).get_submodule({module_name!r})", call


def other_instances(model: str, module_name: str) -> list[str]:
    """One instance of each other set of weight shapes of the class of MODEL's submodule MODULE_NAME."""
    built = built_model(model)
    target = built.get_submodule(module_name)
    seen, others = {used_weights(target)}, []
    for name, module in built.named_modules():
        if type(module) is type(target) and used_weights(module) not in seen:
            seen.add(used_weights(module))
            others.append(name)
    return others


def scan(model: nn.Module, model_spec: str, model_input: str | None = None) -> tuple[ScannedClass, ...]:
    """Every class of the model that holds weights; commands carry `model_input` where given, and need it where the
    model says nothing of its input (no transformers config)."""
    if model_input is None:
        try:
            model_input_choices(model)
        except AnalysisError as error:
            model_input = error  # no command without an input: each class says so
    found: dict[tuple[type, bool, str], list[tuple[str, nn.Module, tuple]]] = {}
    stored = _storage_of(model_spec, model_input)
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or ".parametrizations." in f".{name}.":
            continue  # a parametrization's pieces: listed as the weight they compute, under its owner
        weights = used_weights(module)
        if weights:
            key = (_scanned_class(module), parametrize.is_parametrized(module), stored(name, module))
            found.setdefault(key, []).append((name or ROOT, module, weights))
    direct = set() if isinstance(model_input, AnalysisError) else _read_directly(found, model_spec, model_input)
    _add_parents_reading(found, direct, model)
    return tuple(
        _describe(cls, instances, model, model_spec, model_input, direct, storage_text)
        for (cls, _, storage_text), instances in found.items()
    )


def _storage_of(model_spec: str, model_input):
    """`stored(name, module)`: how the module keeps its weights (`stored_weights.storage`). A rounding is measured on
    the model built for real (once, and only where a module may round) and fed its input."""
    real: list[nn.Module] = []

    def measured_on(name: str):
        if isinstance(model_input, AnalysisError) or not name:
            return None
        expression = model_expression(model_spec)
        try:
            real[:] = real or [built_model(expression)]
        except ScaffoldError:
            return None
        return real[0], ModelCall(expression, name, model_input or default_model_input(real[0]))

    return lambda name, module: storage(module, lambda: measured_on(name))


def _read_directly(found: dict, model_spec: str, model_input: str | None) -> set[str]:
    """Modules PEFT adapts whose weights the model reads without calling them (asked of the model built for real,
    run once): PEFT's layer there would be dead."""
    names = [
        name
        for (cls, parametrized, _), instances in found.items()
        if peft_layer_unchanged(cls) and not parametrized
        for name, _, _ in instances
        if name != ROOT
    ]
    if not names:
        return set()
    try:
        real = built_model(model_expression(model_spec))
        return read_without_call(real, names, model_input or default_model_input(real))
    except ScaffoldError:  # the model does not build for real, or gives no input: nothing to tell
        return set()


def _add_parents_reading(found: dict, direct: set[str], model: nn.Module) -> None:
    """The parent of a module read directly adapts that module's weight (`--weight LEAF.weight`), unless its class
    has weights of its own, and so a command for one of them (one layer a class)."""
    own = {(cls, parametrized) for cls, parametrized, _ in found}
    for name in sorted(direct):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else None
        key = (_scanned_class(parent), parametrize.is_parametrized(parent)) if parent is not None else None
        if key is None or key in own:
            continue
        weights = tuple((f"{leaf}.{weight}", shape) for weight, shape in used_weights(model.get_submodule(name)))
        found.setdefault((*key, ""), []).append((parent_name, parent, weights))


def used_weights(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The module's own parameters and quantized buffers (BitNet's packed `weight`), a parametrized weight as the
    tensor it computes."""
    own = [(name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False)]
    own += [
        (name, tuple(b.shape)) for name, b in module.named_buffers(recurse=False) if name in quantized_tensors(module)
    ]
    if parametrize.is_parametrized(module):
        own += [(name, tuple(getattr(module, name).shape)) for name in module.parametrizations]
    return tuple(own)


def _scanned_class(module: nn.Module) -> type:
    """The class a user knows: torch generates one for each parametrized module (ParametrizedConv1d)."""
    cls = type(module)
    return cls.__bases__[0] if cls.__module__ == parametrize.__name__ else cls


def _describe(
    cls: type, instances: list, model: nn.Module, model_spec: str, model_input, direct: set[str], storage_text: str
) -> ScannedClass:
    variants: dict[tuple, list[str]] = {}
    for name, _, weights in instances:
        variants.setdefault(weights, []).append(name)
    # The instance the command targets: the first with a weight LoRA can adapt (Swin's bias tables differ per stage).
    name, module, weights = next((i for i in instances if _adaptable(i[2], i[1])), instances[0])
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    handled = peft_layer(module, name, model)
    parametrized = type(module) is not cls
    if handled.startswith("lora.") and not peft_builtin(cls, exact=True) and peft_builtin(cls):
        handled += ", as for its base class"
    if parametrized and handled:
        handled += ", whose merge is lost: it writes into a weight the parametrization computes anew"
    kept_apart = _peft_float_layer(handled) and _weight_kept_apart(storage_text)
    if kept_apart:
        handled += f", whose merge cannot keep W + dW: {storage_text}"
    dead = [name for name, _, _ in instances if name in direct]
    if dead and handled.startswith("lora."):
        handled += f", dead at {', '.join(dead)}: the model reads the weight there without calling the module"
    command, why_not, target_module, weight, unadapted = "", "", "", "", ()
    adaptable = _adaptable(weights, module)
    if peft_layer_unchanged(cls) and not parametrized and not kept_apart:
        pass  # PEFT's own layer serves it: nothing to generate
    elif not adaptable:
        why_not = "no weight with 2 or more dimensions: nothing for LoRA to adapt"
    elif "." in cls.__qualname__ or cls.__module__ == "__main__":
        why_not = f"{cls.__qualname__} is defined in a function or __main__, where generated code cannot import it"
    elif isinstance(model_input, AnalysisError):
        why_not = f"{model_input}".replace("pass --model-input", "scan with --model-input")
    elif name == ROOT:
        why_not = "it is the model itself, which --module cannot name: run `new` on its class directly"
    elif parametrized and "." not in name:
        why_not = (
            "a parametrization computes its weight, so its parent is the target, and that is the model itself: build "
            "the parametrized module alone with `new ... --init EXPR`"
        )
    else:
        target_module, weight = _target(name, adaptable, parametrized, quantized_tensors(module))
        chosen = weight.rpartition(".")[2] if parametrized else weight
        unadapted = tuple(other for other, _ in adaptable if other != chosen)
        words = ["lora-scaffold", "new", "--from-model", model_spec, "--module", target_module, "--weight", weight]
        words += ["--model-input", model_input] if model_input else []
        command = shlex.join([*words, "-o", "lora_layers"])
    return ScannedClass(
        qualified_name=qualified + (" (parametrized)" if parametrized else ""),
        instances=len(instances),
        example=name,
        weights=weights,
        variants=tuple(Variant(tuple(names), shapes) for shapes, names in variants.items()),
        handled_by=handled,
        command=command,
        why_not=why_not,
        module=target_module,
        weight=weight,
        storage=storage_text,
        unadapted=unadapted,
    )


def _adaptable(weights: tuple[tuple[str, tuple[int, ...]], ...], module: nn.Module) -> list[tuple[str, tuple]]:
    """Matrices, and quantized tensors whatever their packed shape (bitsandbytes' 4-bit column of bytes)."""
    quantized = quantized_tensors(module)
    return [(n, shape) for n, shape in weights if sum(size > 1 for size in shape) >= 2 or n in quantized]


def _peft_float_layer(handled: str) -> bool:
    """PEFT's answer is one of its layers for float weights (lora.Linear, ...), not a quantization backend's."""
    from peft.tuners.lora import layer

    name = handled.removeprefix("lora.").split(",")[0] if handled.startswith("lora.") else ""
    return isinstance(getattr(layer, name, None), type)


def _weight_kept_apart(storage_text: str) -> bool:
    """The `weight` PEFT's float layers merge into is stored quantized or rounded by the forward."""
    return any(part.startswith("weight ") for part in storage_text.split("; "))


def _target(name: str, adaptable: list, parametrized: bool, quantized: dict[str, str]) -> tuple[str, str]:
    """(submodule, weight) of the command: the one named `weight`, else the largest float one, else the largest
    quantized one (as `new` chooses); a parametrized module's through its parent, which torch did not generate."""
    named = [n for n, _ in adaptable if n == "weight"]
    floats = [item for item in adaptable if item[0] not in quantized] or adaptable
    weight = named[0] if named else max(floats, key=lambda item: math.prod(item[1]))[0]
    if not parametrized:
        return name, weight
    parent, _, leaf = name.rpartition(".")
    return parent, f"{leaf}.{weight}"
