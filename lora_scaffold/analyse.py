"""Stage 3: choose the weight, an input, and how LoRA applies to the target (from the registry's verdicts)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from lora_scaffold import strategies
from lora_scaffold.capture import left_empty, recorded_call
from lora_scaffold.errors import AnalysisError
from lora_scaffold.introspect import TargetSpec, TensorInfo
from lora_scaffold.layer_plan import (
    CallFacts,
    Decision,
    InputInfo,
    LayerNames,
    LayerPlan,
    TargetFacts,
    WeightFacts,
    example_call,
)
from lora_scaffold.names import expression_source, layer_names
from lora_scaffold.probe import responds, run_probe
from lora_scaffold.request import Options
from lora_scaffold.rounding import rounding
from lora_scaffold.sample_input import (
    SEED,
    candidate_inputs,
    find_sample_input,
    flatten_output,
    run_call,
)
from lora_scaffold.strategies import Evidence, Strategy, Verdict
from lora_scaffold.weight_choice import choose_weight, require_invertible


# Modules whose parents (TransformerEncoderLayer) have an eval fast path that reads their weights directly.
FUSED_PATH_MODULES = (nn.MultiheadAttention,)


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
    module = spec.build()
    if weight.computed:
        require_invertible(spec, module, weight.name)
    attributes = spec.attribute_values()
    if options.model_call is not None:
        example_input = (
            f"what {options.model_call.module} receives from the model's forward on {options.model_call.model_input}"
        )
        run_call(module, *recorded_call(options.model_call, SEED), "the call the model makes")
    elif options.example_input:
        example_input = expression_source(options.example_input, "--example-input")
        find_sample_input(module, [example_input], given=True)
    else:
        candidates = candidate_inputs(weight.shape, spec.forward_arity, attributes, storage_shaped=weight.quantized)
        # A quantized weight cannot be moved a little to see the output respond: the first input that runs.
        moves = None if weight.quantized else (lambda inputs: responds(module, weight, inputs))
        example_input = find_sample_input(module, candidates, responds=moves)
    make_call = example_call(example_input, options.model_call)
    if not weight.quantized and (rounded := rounding(module, weight.name, make_call)):
        weight = dataclasses.replace(weight, quantized=True, rounded=rounded)
    asked = strategies.asked_for(options.strategy) if options.strategy != strategies.AUTO else ()
    needs_probe = not weight.quantized and (not asked or any(strategy.needs_probe for strategy in asked))
    probe = run_probe(module, weight, make_call, example_input) if needs_probe else None
    evidence = Evidence(module, weight, attributes, probe, make_call, spec.build)
    choice = choose_strategy(evidence, options.strategy)
    strategy, verdict = choice.strategy, choice.verdict
    eval_only = probe.train_mode_note if probe else strategy.eval_only(evidence)
    settles = strategy.settles(evidence)
    if settles:
        choice = dataclasses.replace(
            choice, reason=f"{choice.reason} (its first forward in eval mode changes its state: {settles})"
        )
    if eval_only:
        choice = dataclasses.replace(choice, reason=f"{choice.reason} (compared in eval mode: {eval_only})")
    groups = strategy.groups(attributes)
    args, kwargs = make_call(SEED)
    inputs, output_features, output_is_tuple = describe_io(module, args, kwargs)
    return LayerPlan(
        target=TargetFacts(
            given=spec.target.spec,
            module=spec.target.import_module,
            class_name=spec.target.class_name,
            ctor_args=spec.ctor_args,
            init=spec.init,
            init_imports=spec.init_imports,
            uninitialised=spec.uninitialised,
            peft_builtin=strategies.peft_builtin(spec.target.cls),
            peft_builtin_exact=strategies.peft_builtin(spec.target.cls, exact=True) is not None,
            parameterless=not spec.parameters,
            children=tuple(name for name, _ in module.named_children()),
        ),
        weight=WeightFacts(
            name=weight.name,
            shape=weight.shape,
            bias_name=_bias_name(
                spec, evidence, strategy, strategy.bias_size(weight.shape, verdict.fan_in_fan_out, groups)
            ),
            computed=weight.computed,
            flat_rnn=isinstance(module.get_submodule(weight.name.rpartition(".")[0]), nn.RNNBase),
            read_by_fused_parents=isinstance(module, FUSED_PATH_MODULES),
            quantized=weight.quantized,
            stored_in=weight.holder if strategies.peft_builtin(spec.target.cls) else "",
            held_beside=held_beside(module, weight) if strategies.peft_builtin(spec.target.cls) else (),
        ),
        decision=Decision(
            strategy=strategy.name,
            fan_in_fan_out=verdict.fan_in_fan_out,
            groups=groups,
            reason=choice.reason,
            verdicts=choice.verdicts,
            answers=tuple(strategy.template_answers(evidence).items()),
            dora_blocker=strategy.dora_blocker(evidence, verdict),
            tolerant_merge=strategy.tolerant_merge(evidence),
            lacks_quantization_backend=strategy.lacks_quantization_backend(evidence),
            settles=settles,
            eval_only=eval_only,
            factored_dtype=strategy.factored_dtype(evidence),
            test_rank=strategy.test_rank(groups),
        ),
        call=CallFacts(
            example_input=example_input,
            input_inferred=options.example_input is None and options.model_call is None,
            model_call=options.model_call,
            model_uninitialised=left_empty(options.model_call.model) if options.model_call else (),
            keywords=tuple(kwargs),
            inputs=inputs,
            output_features=output_features,
            output_is_tuple=output_is_tuple,
            battery_blocker=battery_blocker(module, len(inputs) != len(args), tuple(kwargs))
            or strategy.battery_blocker(evidence),
        ),
        names=LayerNames(layer_class, module_name, f"test_{module_name}"),
    )


def choose_strategy(evidence: Evidence, choice: str) -> Choice:
    """`auto`: the first strategy of the registry that fits and that the probe confirms; otherwise the one asked."""
    auto = choice == strategies.AUTO
    if auto:
        candidates = [s for s in strategies.REGISTRY if s.tried_by_auto and s.fits(evidence)]
    else:
        candidates = list(strategies.asked_for(choice))
    weight = evidence.weight
    if weight.quantized:
        able = [s.family for s in strategies.REGISTRY if s.adapts_quantized]
        candidates = _narrowed(
            candidates,
            lambda s: s.adapts_quantized,
            lambda unfit: (
                f"--strategy {choice} cannot adapt {weight.name}, stored as {weight.dtype} ({unfit} write "
                f"W + dW into the weight, which its storage would lose); use --strategy {' or '.join(able)}"
            ),
        )
    if weight.computed:
        candidates = _narrowed(
            candidates,
            lambda s: s.adapts_computed_weights,
            lambda unfit: (
                f"--strategy {choice} cannot merge into {weight.name}, which a parametrization computes "
                f"({unfit} write the weight itself); use --strategy {strategies.FALLBACK.family}"
            ),
        )
    tried: list[Verdict] = []
    for strategy in candidates:
        verdicts = strategy.judge(evidence)
        matched = next((verdict for verdict in verdicts if verdict.matched), None)
        if matched is not None:
            return Choice(strategy, matched, (*tried, *verdicts), _reason(evidence, matched, tried, auto))
        tried += verdicts
    failed = "; ".join(f"{verdict.label}: {verdict.describe()}" for verdict in tried)
    target = f"{type(evidence.module).__name__}.{evidence.weight.name}"
    if evidence.weight.quantized:  # nothing else adapts quantized storage: the cause is what to act on
        raise AnalysisError(f"--strategy {choice} does not fit {target} ({failed})")
    raise AnalysisError(
        f"--strategy {choice} does not fit {target} ({failed}); use --strategy auto or {strategies.FALLBACK.family}"
    )


def _narrowed(candidates: list[Strategy], able, refusal) -> list[Strategy]:
    """The candidates `able` accepts; none: an error saying which were refused (`refusal(their names)`)."""
    kept = [strategy for strategy in candidates if able(strategy)]
    if not kept:
        raise AnalysisError(refusal(", ".join(s.name for s in candidates if not able(s))))
    return kept


def _reason(evidence: Evidence, verdict: Verdict, tried: list[Verdict], auto: bool) -> str:
    reason = verdict.strategy.reason(evidence, verdict)
    if not auto:
        return f"forced: {reason}"
    if verdict.strategy.fallback and evidence.weight.computed:
        return f"auto: {evidence.weight.name} is computed by a parametrization, which only {verdict.strategy.name} merges into; {reason}"
    if verdict.strategy.fallback:
        found = "; ".join(f"{v.label}: {v.describe()}" for v in tried if not v.strategy.refines)
        return f"auto: no factored path is exact ({found or 'none fits the weight'}); {reason}"
    return f"auto: {reason}"


def low_rank_note(plan: LayerPlan) -> str:
    """A warning when a rank-r adapter is no smaller than the weight itself ("" otherwise)."""
    if plan.weight.quantized:
        return ""  # packed storage's shape is not the matrix's (bitsandbytes' 4-bit weight is a column of bytes)
    out_size = plan.weight.shape[0]
    in_size = math.prod(plan.weight.shape[1:])
    if len(plan.weight.shape) >= 2 and plan.decision.test_rank * (in_size + out_size) < in_size * out_size:
        return ""
    return (
        f"the weight {list(plan.weight.shape)} is too small for a low-rank adapter to save anything: at rank "
        f"{plan.decision.test_rank} it has {plan.decision.test_rank * (in_size + out_size)} parameters, the weight {in_size * out_size}"
    )


def describe_io(module: nn.Module, inputs: tuple, kwargs: dict) -> tuple[tuple[InputInfo, ...], int, bool]:
    """Per-sample input shapes and output size, for test models that feed the target from other layers."""
    with torch.no_grad():
        output = module(*inputs, **kwargs)
    first = next(t for t in flatten_output(output) if isinstance(t, torch.Tensor))
    described = tuple(
        InputInfo(tuple(x.shape[1:]), x.is_floating_point(), 0 if x.is_floating_point() else int(x.max()) + 1)
        for x in inputs
        if isinstance(x, torch.Tensor)
    )
    return described, int(first[0].numel()), not isinstance(output, torch.Tensor)


def held_beside(module: nn.Module, weight: TensorInfo) -> tuple[str, ...]:
    """The tensors a class PEFT adapts itself holds here beside its weight and bias, where its forward rounds the
    weight (compressed-tensors' `weight_scale`, `weight_zero_point`): what tells it from the plain instances PEFT
    keeps adapting. Empty where the weight is not rounded, or a tensor subclass tells it apart (`stored_in`)."""
    if not weight.rounded or weight.holder:
        return ()
    owner_name, _, leaf = weight.name.rpartition(".")
    owner = module.get_submodule(owner_name)
    own = [*owner._parameters, *owner._buffers]
    held = [name for name in own if name not in (leaf, "bias") and getattr(owner, name, None) is not None]
    return tuple(name for name in held if name.isidentifier())


def battery_blocker(module: nn.Module, nested_inputs: bool, keywords: tuple[str, ...] = ()) -> str:
    """Why PEFT's custom-model battery cannot run on this target ("" when it can)."""
    if keywords:
        return f"PEFT's battery feeds every model one tensor, and {type(module).__name__} takes {', '.join(keywords)}"
    if nested_inputs:
        return f"PEFT's battery feeds every model one tensor, and {type(module).__name__} takes nested inputs"
    bias = getattr(module, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        return (
            f"PEFT's test_save_load_roundtrip_fsdp_wrapped_learnable_bias sets `.bias.data` on every module, and "
            f"{type(module).__name__}.bias is a {type(bias).__name__}"
        )
    return ""


def _bias_name(spec: TargetSpec, evidence: Evidence, strategy: Strategy, size: int | None) -> str | None:
    """The bias lora_bias merges into: `bias` beside the weight, of the output's size, which the probe finds added
    to the output (a `bias` the forward ignores would make merging wrong)."""
    prefix = evidence.weight.name.rpartition(".")[0]
    name = f"{prefix}.bias" if prefix else "bias"
    bias = spec.parameter(name)
    if size is None or bias is None or bias.shape != (size,) or evidence.probe is None:
        return None
    error = evidence.probe.bias_error(name, lambda change, output: strategy.bias_change(evidence, change, output))
    return name if evidence.probe.exact(error) else None
