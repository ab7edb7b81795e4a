"""What analysis decides about one target, as plain data in five parts: the target class and how the tests build it,
the weight LoRA adapts, the strategy chosen and why, how the target is called, and the generated names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_scaffold import strategies
from lora_scaffold.capture import recorded_call
from lora_scaffold.peft_release import PATCH, QUANTIZATION_BACKEND, PeftRelease
from lora_scaffold.request import ModelCall
from lora_scaffold.sample_input import SEED, evaluate_input
from lora_scaffold.strategies import Strategy, Verdict


@dataclass(frozen=True)
class TargetFacts:
    """The class LoRA is generated for, and how the generated tests build it."""

    given: str  # as the user named it (module.Class or path/file.py:Class)
    module: str
    class_name: str
    ctor_args: tuple[tuple[str, str], ...]
    init: str | None  # the --init expression that builds the target (then ctor_args is empty)
    init_imports: tuple[tuple[str, tuple[str, ...]], ...]
    uninitialised: tuple[str, ...]  # parameters the tests fill after building the target (left torch.empty)
    peft_builtin: str | None  # PEFT's own layer for the class or a base of it
    peft_builtin_exact: bool  # ... for the class itself
    parameterless: bool  # no parameters at all (BitNet's BitLinear keeps its weight in buffers)
    children: tuple[str, ...] = ()  # its child modules, which PEFT may wrap through the layer

    @property
    def in_torch(self) -> bool:
        """Whether the target comes from torch, which any peft installation can import."""
        return self.module.split(".")[0] == "torch"


@dataclass(frozen=True)
class WeightFacts:
    """The weight LoRA adapts and what reads or computes it."""

    name: str
    shape: tuple[int, ...]
    bias_name: str | None  # the bias lora_bias merges into (the probe found it added to the output)
    computed: bool  # a parametrization computes the weight (merging goes through its right_inverse)
    flat_rnn: bool  # an RNN's flat weight, which the layer must keep in step with its cuDNN copy
    read_by_fused_parents: bool  # models around it may read its weights in fused kernels of their own
    quantized: bool = False  # stored quantized: the base is never written, merging refused or within a tolerance
    # The tensor subclass the weight is stored in, where that is what sets the target apart from a class PEFT
    # adapts itself (a torchao-quantized nn.Linear): registration dispatches on it ("" otherwise).
    stored_in: str = ""
    # The tensors the target holds beside its weight, where those set it apart from a class PEFT adapts itself (a
    # compressed-tensors nn.Linear whose forward rounds `weight` with `weight_scale`): registration dispatches on them.
    held_beside: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The strategy chosen, with every verdict the registry gave and what only the strategy's partials read."""

    strategy: str
    fan_in_fan_out: bool
    groups: int
    reason: str
    verdicts: tuple[Verdict, ...]
    answers: tuple[tuple[str, Any], ...]  # the strategy's own template answers (its business)
    dora_blocker: str
    # Merges within a tolerance the user can raise (W + dW requantized by the library, or cast back into float8),
    # else refuses.
    tolerant_merge: bool
    settles: str  # why the tests run the base once in eval mode before anything ("" when they need not)
    lacks_quantization_backend: bool  # a quantized base the installed PEFT has no QuantizationBackend for
    eval_only: str  # why the generated tests compare outputs in eval mode only ("" when they need not)
    # The dtype ("float64", or "float32" for a forward that does not run in float64) in which the proof showed the
    # factored path equal to the forward with W + dW: the layer's training forward takes it ("" where it does not).
    factored_dtype: str
    test_rank: int

    @property
    def chosen(self) -> Strategy:
        return strategies.named(self.strategy)

    def adds_quantization_backend(self, peft: PeftRelease) -> bool:
        """Patch mode on peft 0.21 on, for a quantized base PEFT has no backend for: the layer module also holds a
        QuantizationBackend, and resolve_quantization_backend returns it, so PEFT's other tuners adapt the base."""
        return peft.mode == PATCH and peft.has(QUANTIZATION_BACKEND) and self.lacks_quantization_backend


@dataclass(frozen=True)
class InputInfo:
    """One positional input of the example, per sample: shape without the batch dimension, and its kind."""

    shape: tuple[int, ...]
    floating: bool
    high: int


@dataclass(frozen=True)
class CallFacts:
    """How the target is called, by the probe and by the generated tests, and what it returns."""

    example_input: str  # an expression of the positional inputs, or (model_call) a description of the call
    input_inferred: bool
    model_call: ModelCall | None  # the input is the call the model makes to the target (recorded again by the tests)
    model_uninitialised: tuple[str, ...]  # the model's parameters its init leaves torch.empty, filled by the tests
    keywords: tuple[str, ...]  # keyword arguments of that call (positional ones are in `inputs`)
    inputs: tuple[InputInfo, ...]
    output_features: int
    output_is_tuple: bool
    battery_blocker: str  # why PEFT's custom-model battery, which feeds one tensor, cannot call it ("" if it can)

    def example_call(self, seed: int = SEED) -> tuple[tuple, dict]:
        return example_call(self.example_input, self.model_call)(seed)


@dataclass(frozen=True)
class LayerNames:
    layer_class: str
    module_name: str
    test_module: str


@dataclass(frozen=True)
class LayerPlan:
    target: TargetFacts
    weight: WeightFacts
    decision: Decision
    call: CallFacts
    names: LayerNames


def example_call(example_input: str, model_call: ModelCall | None):
    """seed -> (args, kwargs) the target is called with: the expression's inputs, or the model's call."""
    if model_call is not None:
        return lambda seed: recorded_call(model_call, seed)
    return lambda seed: (evaluate_input(example_input, seed), {})
