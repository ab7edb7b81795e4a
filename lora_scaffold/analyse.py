"""Stage 3: choose the weight, an input, and how LoRA applies to the target (from the registry's verdicts)."""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

import torch
from torch import nn

from lora_scaffold import strategies
from lora_scaffold.errors import AnalysisError
from lora_scaffold.introspect import TargetSpec, TensorInfo, instantiate
from lora_scaffold.probe import Probe
from lora_scaffold.sample_input import candidate_inputs, evaluate_input, find_sample_input, flatten_output
from lora_scaffold.strategies import Evidence, Strategy, Verdict


@dataclass(frozen=True)
class Options:
    weight: str | None = None
    strategy: str = strategies.AUTO
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
    groups: int
    reason: str
    verdicts: tuple[Verdict, ...]
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

    @property
    def target_in_torch(self) -> bool:
        """Whether the target comes from torch, which any peft installation can import."""
        return self.target_module.split(".")[0] == "torch"

    @property
    def chosen(self) -> Strategy:
        return strategies.named(self.strategy)


@dataclass(frozen=True)
class Choice:
    strategy: Strategy
    verdict: Verdict
    verdicts: tuple[Verdict, ...]
    reason: str


def analyse(spec: TargetSpec, options: Options) -> LayerPlan:
    if options.strategy not in strategies.CHOICES:
        choices = ", ".join(strategies.CHOICES)
        raise AnalysisError(f"unknown strategy {options.strategy!r}; choose from {choices}")
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
    asked = strategies.asked_for(options.strategy) if options.strategy != strategies.AUTO else ()
    needs_probe = not asked or any(strategy.needs_probe for strategy in asked)
    probe = run_probe(module, weight, example_input) if needs_probe else None
    evidence = Evidence(module, weight, attributes, probe)
    choice = choose_strategy(evidence, options.strategy)
    strategy, verdict = choice.strategy, choice.verdict
    groups = strategy.groups(attributes)
    inputs, output_features, output_is_tuple = describe_io(module, example_input)
    return LayerPlan(
        target_spec=spec.target.spec,
        target_module=spec.target.import_module,
        target_class=spec.target.class_name,
        ctor_args=spec.ctor_args,
        weight_name=weight.name,
        weight_shape=weight.shape,
        bias_name=_bias_name(spec, weight, strategy.bias_size(weight.shape, verdict.fan_in_fan_out, groups)),
        strategy=strategy.name,
        fan_in_fan_out=verdict.fan_in_fan_out,
        groups=groups,
        reason=choice.reason,
        verdicts=choice.verdicts,
        example_input=example_input,
        input_inferred=options.example_input is None,
        inputs=inputs,
        output_features=output_features,
        output_is_tuple=output_is_tuple,
        test_rank=strategy.test_rank(groups),
        layer_class=layer_class,
        module_name=module_name,
        test_module=f"test_{module_name}",
        peft_builtin=strategies.peft_builtin(spec.target.cls),
        peft_builtin_exact=strategies.peft_builtin(spec.target.cls, exact=True) is not None,
        battery_blocker=battery_blocker(module),
        flat_rnn_weights=isinstance(module.get_submodule(weight.name.rpartition(".")[0]), nn.RNNBase),
        dora_blocker=strategy.dora_blocker(evidence, verdict),
    )


def choose_strategy(evidence: Evidence, choice: str) -> Choice:
    """`auto`: the first strategy of the registry that fits and that the probe confirms; otherwise the one asked."""
    auto = choice == strategies.AUTO
    if auto:
        candidates = [s for s in strategies.REGISTRY if s.tried_by_auto and s.fits(evidence)]
    else:
        candidates = list(strategies.asked_for(choice))
    tried: list[Verdict] = []
    for strategy in candidates:
        verdicts = strategy.judge(evidence)
        matched = next((verdict for verdict in verdicts if verdict.matched), None)
        if matched is not None:
            return Choice(strategy, matched, (*tried, *verdicts), _reason(evidence, matched, tried, auto))
        tried += verdicts
    failed = "; ".join(f"{verdict.label}: {verdict.describe()}" for verdict in tried)
    target = f"{type(evidence.module).__name__}.{evidence.weight.name}"
    raise AnalysisError(f"--strategy {choice} does not fit {target} ({failed}); use --strategy auto or delta")


def _reason(evidence: Evidence, verdict: Verdict, tried: list[Verdict], auto: bool) -> str:
    reason = verdict.strategy.reason(evidence, verdict)
    if not auto:
        return f"forced: {reason}"
    if verdict.strategy.fallback:
        found = "; ".join(f"{v.label}: {v.describe()}" for v in tried if v.strategy is not strategies.REUSE)
        return f"auto: no factored path is exact ({found or 'none fits the weight'}); {reason}"
    return f"auto: {reason}"


def run_probe(module: nn.Module, weight: TensorInfo, example_input: str) -> Probe:
    try:
        probe = Probe(module, weight.name, evaluate_input(example_input))
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


def battery_blocker(module: nn.Module) -> str:
    """Why PEFT's custom-model battery cannot run on this target ("" when it can)."""
    bias = getattr(module, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        return (
            f"PEFT's test_save_load_roundtrip_fsdp_wrapped_learnable_bias sets `.bias.data` on every module, and "
            f"{type(module).__name__}.bias is a {type(bias).__name__}"
        )
    return ""


def _bias_name(spec: TargetSpec, weight: TensorInfo, size: int | None) -> str | None:
    """The bias lora_bias merges into: `bias` beside the weight, of the output's size."""
    prefix = weight.name.rpartition(".")[0]
    name = f"{prefix}.bias" if prefix else "bias"
    bias = spec.parameter(name)
    return name if size is not None and bias is not None and bias.shape == (size,) else None


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
