"""Stage 3: choose the weight, an input, and how LoRA applies to the target (the strategy), and name the output."""

from __future__ import annotations

import keyword
import math
import re
import shlex
from dataclasses import dataclass

import torch
from torch import nn

from lora_scaffold import probe as probes
from lora_scaffold.errors import AnalysisError
from lora_scaffold.introspect import TargetSpec, TensorInfo, instantiate
from lora_scaffold.sample_input import candidate_inputs, evaluate_input, find_sample_input, flatten_output


STRATEGIES = ("auto", "linear", "conv", "embedding", "delta", "reuse", "stub")
FACTORED = ("linear", "conv", "embedding")
CONV_FAMILY = ("conv", "conv_transpose")
DORA_STRATEGIES = ("linear", "conv")
NO_DORA = {
    "conv_transpose": "PEFT has no DoRA for transposed convolutions",
    "embedding": "lora-scaffold does not generate DoRA for embeddings yet",
    "delta": "DoRA rescales a weight acting as a linear map or a convolution, and the probe found neither",
    "stub": "a stub implements no variants until it is written",
}

# Parent classes whose PEFT layer a subclass can reuse, with the strategy the probe must confirm.
REUSABLE = {nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv"}

# PEFT's own layers, by the base class they adapt; a generated layer for these overrides PEFT's when registered.
PEFT_BUILTINS = {
    nn.Linear: "Linear",
    nn.Embedding: "Embedding",
    nn.Conv1d: "Conv1d",
    nn.Conv2d: "Conv2d",
    nn.Conv3d: "Conv3d",
    nn.MultiheadAttention: "MultiheadAttention",
}


@dataclass(frozen=True)
class Options:
    weight: str | None = None
    strategy: str = "auto"
    example_input: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class InputInfo:
    """One positional input of the example, per sample: shape without the batch dimension, and its kind."""

    shape: tuple[int, ...]
    floating: bool
    high: int


@dataclass(frozen=True)
class LayerPlan:
    target_spec: str
    target_module: str
    target_class: str
    ctor_args: tuple[tuple[str, str], ...]
    weight_name: str
    weight_shape: tuple[int, ...]
    bias_name: str | None
    strategy: str
    fan_in_fan_out: bool
    conv_dims: int
    groups: int
    reason: str
    probes: tuple[probes.ProbeOutcome, ...]
    example_input: str
    input_inferred: bool
    inputs: tuple[InputInfo, ...]
    output_features: int
    output_is_tuple: bool
    test_rank: int
    layer_class: str
    module_name: str
    test_module: str
    peft_builtin: str | None
    peft_builtin_exact: bool
    battery_blocker: str
    dora_blocker: str
    flat_rnn_weights: bool
    command: str

    @property
    def target_in_torch(self) -> bool:
        """Whether the target comes from torch, which any peft installation can import."""
        return self.target_module.split(".")[0] == "torch"


def analyse(spec: TargetSpec, options: Options) -> LayerPlan:
    if options.strategy not in STRATEGIES:
        raise AnalysisError(f"unknown strategy {options.strategy!r}; choose from {', '.join(STRATEGIES)}")
    layer_class, module_name = layer_names(spec.target.class_name, options.name)
    weight = choose_weight(spec, options.weight)
    module = instantiate(spec.target, spec.ctor_kwargs())
    attributes = spec.attribute_values()
    if options.example_input:
        example_input = options.example_input
        find_sample_input(module, [example_input])
    else:
        candidates = candidate_inputs(weight.shape, spec.forward_arity, attributes)
        example_input = find_sample_input(module, candidates)
    probe = None if options.strategy == "stub" else run_probe(module, weight, example_input)
    strategy, fan_in_fan_out, outcomes, reason = choose_strategy(probe, module, weight, attributes, options)
    groups = attributes.get("groups", 1) if strategy in CONV_FAMILY else 1
    inputs, output_features, output_is_tuple = describe_io(module, example_input)
    return LayerPlan(
        target_spec=spec.target.spec,
        target_module=spec.target.import_module,
        target_class=spec.target.class_name,
        ctor_args=spec.ctor_args,
        weight_name=weight.name,
        weight_shape=weight.shape,
        bias_name=_bias_name(spec, weight, strategy, fan_in_fan_out),
        strategy=strategy,
        fan_in_fan_out=fan_in_fan_out,
        conv_dims=len(weight.shape) - 2 if strategy in CONV_FAMILY else 0,
        groups=groups,
        reason=reason,
        probes=outcomes,
        example_input=example_input,
        input_inferred=options.example_input is None,
        inputs=inputs,
        output_features=output_features,
        output_is_tuple=output_is_tuple,
        test_rank=math.lcm(4, groups),
        layer_class=layer_class,
        module_name=module_name,
        test_module=f"test_{module_name}",
        peft_builtin=peft_builtin(spec.target.cls),
        peft_builtin_exact=peft_builtin(spec.target.cls, exact=True) is not None,
        battery_blocker=battery_blocker(module),
        flat_rnn_weights=isinstance(module.get_submodule(weight.name.rpartition(".")[0]), nn.RNNBase),
        dora_blocker=dora_blocker(probe, module, weight.name, strategy, fan_in_fan_out, attributes),
        command=regenerate_command(spec, options),
    )


def describe_io(module: nn.Module, example_input: str) -> tuple[tuple[InputInfo, ...], int, bool]:
    """Per-sample input shapes and output size, for test models that feed the target from other layers."""
    inputs = evaluate_input(example_input)
    with torch.no_grad():
        output = module(*inputs)
    first = next(t for t in flatten_output(output) if isinstance(t, torch.Tensor))
    described = tuple(
        InputInfo(tuple(x.shape[1:]), x.is_floating_point(), 0 if x.is_floating_point() else int(x.max()) + 1)
        for x in inputs
    )
    return described, int(first[0].numel()), not isinstance(output, torch.Tensor)


def choose_weight(spec: TargetSpec, requested: str | None) -> TensorInfo:
    if not spec.parameters:
        what = "only buffers" if spec.buffers else "no parameters"
        raise AnalysisError(f"{spec.target.class_name} has {what}: there is no trainable weight for LoRA to adapt")
    if requested is not None:
        found = spec.parameter(requested)
        if found is None:
            names = ", ".join(p.name for p in spec.parameters)
            raise AnalysisError(f"{spec.target.class_name} has no parameter {requested!r}; its parameters: {names}")
        return found
    candidates = [p for p in spec.parameters if len(p.shape) >= 2]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        names = ", ".join(f"{p.name} {list(p.shape)}" for p in spec.parameters)
        raise AnalysisError(
            f"{spec.target.class_name} has no weight of 2 or more dimensions ({names}); pick one with --weight"
        )
    names = ", ".join(f"{p.name} {list(p.shape)}" for p in candidates)
    raise AnalysisError(f"{spec.target.class_name} has several weights ({names}); pick one with --weight NAME")


def run_probe(module: nn.Module, weight: TensorInfo, example_input: str) -> probes.Probe:
    try:
        probe = probes.probe_weight(module, weight.name, evaluate_input(example_input))
    except Exception as exc:
        raise AnalysisError(
            f"running {type(module).__name__} with a changed {weight.name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not probe.weight_matters():
        raise AnalysisError(
            f"the output of {type(module).__name__} does not change with {weight.name!r} on input {example_input}; "
            "pick another --weight or pass --example-input"
        )
    return probe


def choose_strategy(
    probe: probes.Probe | None, module: nn.Module, weight: TensorInfo, attributes: dict, options: Options
) -> tuple[str, bool, tuple[probes.ProbeOutcome, ...], str]:
    """The strategy, whether the weight is stored [in, out], what the probe measured, and why, in words."""
    if options.strategy == "stub":
        return "stub", False, (), "asked for with --strategy stub: the layer is a skeleton to fill in"
    reusable = reusable_family(type(module), weight, attributes)
    if options.strategy == "reuse" and reusable is None:
        raise AnalysisError(
            f"--strategy reuse needs a subclass of nn.Linear, or of nn.Conv1d/2d/3d keeping its constructor, with "
            f"groups=1 and dilation=1, adapting `weight`; {type(module).__name__}.{weight.name} is not one"
        )
    if options.strategy == "auto":
        wanted = _families_for(weight.shape)
    else:
        wanted = (reusable if options.strategy == "reuse" else options.strategy,)
    outcomes = tuple(outcome for family in wanted for outcome in _probe_family(probe, family, attributes))
    for outcome in outcomes:
        reuse_asked = options.strategy in ("auto", "reuse") and outcome.strategy == reusable
        if outcome.matched and reuse_asked and _parent_forward_holds(probe, reusable, attributes, options.strategy):
            parent = peft_builtin(type(module))
            reason = (
                f"{'auto' if options.strategy == 'auto' else 'forced'}: a subclass whose weight still acts as in its "
                f"parent (probe: {outcome.strategy}, relative error {outcome.relative_error:.1e}), so PEFT's own "
                f"lora.{parent} is reused"
            )
            return "reuse", False, outcomes, reason
        if outcome.matched and options.strategy != "reuse":
            how = "forced" if options.strategy != "auto" else "auto"
            reason = f"{how}: the probe shows the weight acts as {outcome.strategy} (relative error {outcome.relative_error:.1e})"
            return outcome.strategy.split(" ")[0], "[in, out]" in outcome.strategy, outcomes, reason
    if options.strategy in (*FACTORED, "reuse"):
        failed = "; ".join(f"{o.strategy}: {_describe(o)}" for o in outcomes)
        raise AnalysisError(
            f"--strategy {options.strategy} does not fit {type(module).__name__}.{weight.name} ({failed}); "
            "use --strategy auto or delta"
        )
    if options.strategy == "delta":
        return "delta", False, outcomes, "forced: the forward runs with W + dW, exact for any forward"
    tried = "; ".join(f"{o.strategy}: {_describe(o)}" for o in outcomes) or "no factored path fits the weight's shape"
    return "delta", False, outcomes, f"auto: no factored path is exact ({tried}); the forward runs with W + dW"


def _parent_forward_holds(probe: probes.Probe, family: str, attributes: dict, strategy_option: str) -> bool:
    """Whether the output is exactly the parent's (`F.linear`/`F.convNd` plus bias); --strategy reuse insists.

    PEFT's layers assume that much: DoRA rescales `output - bias`, and PEFT's conv LoRA ignores padding_mode."""
    parent_forward = probes.probe_affine(probe, family, False, attributes)
    if not parent_forward.matched and strategy_option == "reuse":
        raise AnalysisError(
            f"--strategy reuse needs the parent's forward, and the output {_describe(parent_forward)} from it; "
            "use --strategy auto"
        )
    return parent_forward.matched


def battery_blocker(module: nn.Module) -> str:
    """Why PEFT's custom-model battery cannot run on this target ("" when it can)."""
    bias = getattr(module, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        return (
            f"PEFT's test_save_load_roundtrip_fsdp_wrapped_learnable_bias sets `.bias.data` on every module, and "
            f"{type(module).__name__}.bias is a {type(bias).__name__}"
        )
    return ""


def dora_blocker(
    probe: probes.Probe | None,
    module: nn.Module,
    weight_name: str,
    strategy: str,
    fan_in_fan_out: bool,
    attributes: dict,
) -> str:
    """Why PEFT's DoRA variant cannot serve the generated layer ("" when it can).

    PEFT's DoRA reads `base_layer.weight` and `base_layer.bias` and takes the base output to be the weight's linear
    map (or convolution) plus that bias; the probe checks the last part on the real module."""
    if strategy == "reuse":
        return ""
    if strategy not in DORA_STRATEGIES:
        return NO_DORA[strategy]
    name = type(module).__name__
    if weight_name != "weight":
        return f"PEFT's DoRA reads `base_layer.weight`, and this layer adapts `{weight_name}`"
    bias = getattr(module, "bias", False)
    if bias is not None and not isinstance(bias, torch.Tensor):
        return f"PEFT's DoRA reads `base_layer.bias`, and {name} has no bias tensor (nor `bias = None`)"
    if strategy == "conv" and attributes.get("groups", 1) != 1:
        return f"PEFT's DoRA composes B @ A ungrouped, and this convolution has groups={attributes['groups']}"
    outcome = probes.probe_affine(probe, strategy, fan_in_fan_out, attributes)
    if not outcome.matched:
        return (
            f"PEFT's DoRA takes the output to be the weight's {strategy} map plus the bias, and {name}'s "
            f"{_describe(outcome)}"
        )
    return ""


def reusable_family(cls: type, weight: TensorInfo, attributes: dict) -> str | None:
    """The strategy PEFT's layer for a parent of `cls` implements, when that layer can serve `cls` unchanged.

    PEFT's conv layers build lora_A as `type(base_layer)(in, r, kernel, stride, padding)`: the subclass must keep
    its parent's constructor, and dilation and groups must be 1 (PEFT ignores dilation and cannot merge groups)."""
    if weight.name != "weight":
        return None
    for base, family in REUSABLE.items():
        if cls is base or not issubclass(cls, base):
            continue
        if family == "conv":
            dilation = attributes.get("dilation", 1)
            plain = attributes.get("groups") == 1 and set(
                dilation if isinstance(dilation, tuple) else (dilation,)
            ) == {1}
            if cls.__init__ is not base.__init__ or not plain:
                return None
        return family
    return None


def _families_for(shape: tuple[int, ...]) -> tuple[str, ...]:
    return ("linear", "embedding") if len(shape) == 2 else ("conv",) if len(shape) >= 3 else ()


def _probe_family(probe, family: str, attributes: dict) -> list[probes.ProbeOutcome]:
    if family == "linear":
        return [probes.probe_linear(probe, False), probes.probe_linear(probe, True)]
    if family == "embedding":
        return [probes.probe_embedding(probe, attributes.get("padding_idx"))]
    if family == "conv":
        return [probes.probe_conv(probe, attributes), probes.probe_conv(probe, attributes, probes.CONV_TRANSPOSE)]
    return []


def _describe(outcome: probes.ProbeOutcome) -> str:
    if math.isinf(outcome.relative_error):
        return outcome.note
    return f"differs by {outcome.relative_error:.1e} (relative)"


def _bias_name(spec: TargetSpec, weight: TensorInfo, strategy: str, fan_in_fan_out: bool) -> str | None:
    if strategy not in ("linear", "reuse", *CONV_FAMILY):
        return None
    prefix = weight.name.rpartition(".")[0]
    name = f"{prefix}.bias" if prefix else "bias"
    bias = spec.parameter(name)
    if strategy == "conv_transpose":
        out_features = weight.shape[1] * (spec.attribute_values().get("groups") or 1)
    else:
        out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return name if bias is not None and bias.shape == (out_features,) else None


def peft_builtin(cls: type, exact: bool = False) -> str | None:
    """PEFT's own layer for `cls` (exact: for `cls` itself, not for one of its base classes)."""
    for base, name in PEFT_BUILTINS.items():
        if cls is base or (not exact and issubclass(cls, base)):
            return name
    candidates = cls.__mro__[:1] if exact else cls.__mro__
    if any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in candidates):
        return "Linear"
    return None


def layer_names(class_name: str, name: str | None) -> tuple[str, str]:
    """(layer class, module name) from the target's class name, or from --name."""
    if name is None:
        return f"Lora{class_name}", f"lora_{_snake_case(class_name)}"
    if not name.isidentifier() or keyword.iskeyword(name):
        raise AnalysisError(f"--name {name!r} must be a Python identifier (no path, not a keyword)")
    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
    return f"Lora{camel}", f"lora_{name.lower()}"


def _snake_case(class_name: str) -> str:
    """MyConv -> my_conv, ConvTranspose2d -> conv_transpose2d, Conv1D -> conv1d, GRU -> gru."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z0-9])(?=[A-Z][a-z])", "_", class_name)
    return words.lower().strip("_")


def regenerate_command(spec: TargetSpec, options: Options) -> str:
    words = ["lora-scaffold", "new", spec.target.spec]
    words += [f"--arg={name}={source}" for name, source in spec.ctor_args if name not in spec.guessed_args]
    for flag, value in (
        ("--weight", options.weight),
        ("--example-input", options.example_input),
        ("--name", options.name),
    ):
        if value is not None:
            words.append(f"{flag}={value}")
    if options.strategy != "auto":
        words.append(f"--strategy={options.strategy}")
    return shlex.join(words)
