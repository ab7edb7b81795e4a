"""The numerical probe: what a change of the weight does to the output, measured in float64.

A strategy is trusted only where its formula predicts `f(x; W + t*D) - f(x; W)` exactly for every trial: the
module's own parameters and also every other parameter and floating buffer drawn at random (a gain that happens
to be initialised to ones must not pass for no gain), several inputs, several random D, and several scales and
signs t (a linearity test, not one difference). The module is compared in eval mode; a forward that is random or
changes the module's state in training mode is noted, so that the generated tests compare in eval mode too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from lora_scaffold.errors import USER_CODE_ERRORS, AnalysisError, WeightUnused
from lora_scaffold.introspect import TensorInfo
from lora_scaffold.sample_input import flatten_output, map_tensors


RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
NOT_ONE_TENSOR = float("inf")
PARAMETER_DRAWS = 3  # the module's own values, then random ones
INPUT_SEEDS = (0, 1)
SCALES = (1.0, -0.5, 3.0)


@dataclass(frozen=True)
class Trial:
    """One draw: inputs, the other parameters and buffers, D, and what W + t*D does to the output for each t."""

    inputs: tuple
    keywords: dict
    tensors: dict[str, torch.Tensor]  # every parameter and buffer but the weight
    weight: torch.Tensor
    delta: torch.Tensor
    output: list
    effects: dict[float, list]

    @property
    def x(self):
        """The first positional input (None for a forward that takes none, as a bias table's)."""
        return self.inputs[0] if self.inputs else None


class NotDeterministic(Exception):
    """The module's eval-mode forward gives different outputs for the same input: nothing can be checked."""


def build_probe(module: nn.Module, weight_name: str, make_call: Callable[[int], tuple[tuple, dict]]) -> Probe:
    """In float64 where the module runs in it (a match is then unambiguous), else in float32."""
    try:
        return Probe(module, weight_name, make_call, torch.float64)
    except NotDeterministic:
        raise
    except Exception:
        return Probe(module, weight_name, make_call, torch.float32)


class Probe:
    """A copy of the module in high precision, and the trials every strategy's formula is checked against."""

    def __init__(
        self, module: nn.Module, weight_name: str, make_call: Callable[[int], tuple[tuple, dict]], dtype: torch.dtype
    ):
        self.module = copy.deepcopy(module).to(dtype).eval()

        def cast(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
            return map_tensors(lambda x: x.to(dtype) if x.is_floating_point() else x, call)

        self.weight_name = weight_name
        self.weight = dotted_attribute(self.module, weight_name).detach()
        self.train_mode_note = _train_mode_note(self.module, *cast(make_call(INPUT_SEEDS[0])))
        generator = torch.Generator().manual_seed(1)
        # A weight a parametrization computes is passed in its stead (which bypasses the parametrization).
        pieces = f"{weight_name.rpartition('.')[0]}.parametrizations.{weight_name.rpartition('.')[2]}.".lstrip(".")
        own = {
            name: t.detach()
            for name, t in _state(self.module).items()
            if name != weight_name and not name.startswith(pieces)
        }
        parameters = {name for name, _ in self.module.named_parameters()}
        self.trials = []
        for draw in range(PARAMETER_DRAWS):
            tensors = own if draw == 0 else {n: _redraw(t, n in parameters, generator) for n, t in own.items()}
            for seed in INPUT_SEEDS:
                self.trials.append(self._trial(tensors, cast(make_call(seed)), generator))
        first = self.trials[0]
        with torch.no_grad():
            again = functional_call(
                self.module, {**first.tensors, weight_name: self.weight}, first.inputs, first.keywords
            )
        # Strategies that add the adapter's term to the output (linear, conv, embedding) need the output itself to be
        # one tensor: IBert's QuantLinear returns (y, None), whose float part alone matches `linear`.
        self.output_is_one_tensor = isinstance(again, torch.Tensor)
        if any(_is_float(a) and not torch.equal(a, b) for a, b in zip(first.output, flatten_output(again))):
            raise NotDeterministic("its forward gives different outputs for the same input, even in eval mode")

    def _trial(self, tensors: dict, call: tuple[tuple, dict], generator: torch.Generator) -> Trial:
        scale = float(self.weight.std()) if self.weight.numel() > 1 and float(self.weight.std()) > 0 else 1.0
        delta = torch.randn(self.weight.shape, generator=generator, dtype=self.weight.dtype) * scale
        inputs, keywords = call
        trial = Trial(inputs, keywords, tensors, self.weight, delta, [], {})
        output = self._run(trial, self.weight)
        effects = {}
        for t in SCALES:
            after = self._run(trial, self.weight + t * delta)
            effects[t] = [a - b for a, b in zip(after, output) if _is_float(a)]
        return Trial(inputs, keywords, tensors, self.weight, delta, output, effects)

    def _run(self, trial: Trial, weight: torch.Tensor) -> list:
        with torch.no_grad():
            return flatten_output(
                functional_call(self.module, {**trial.tensors, self.weight_name: weight}, trial.inputs, trial.keywords)
            )

    @property
    def x(self):
        """The first input of the first trial, which strategies check shapes and kinds on."""
        return self.trials[0].x

    @property
    def floating_input(self) -> bool:
        return _is_float(self.x)

    def weight_matters(self) -> bool:
        return any(bool((e != 0).any()) for e in self.trials[0].effects[1.0])

    def weight_effect(self) -> float:
        """How far the output moves, relative to its largest entry, when the weight moves by its own spread (on the
        module's own parameters and the first input): what a test in float32 can see of an adapter."""
        trial = self.trials[0]
        # Masked entries (-inf) neither scale the output nor move (inf - inf is nan): only finite entries count.
        scale = _largest_finite([o for o in trial.output if _is_float(o)])
        moved = _largest_finite(trial.effects[1.0])
        return moved / scale if scale > 0 else math.inf * (moved > 0)

    def error(self, predict: Callable[[Trial], torch.Tensor]) -> float:
        """The largest relative error of `predict(trial)` (the change for D) against the observed changes, over
        every trial and scale; inf when the output is not one tensor of the predicted shape."""
        if not self.output_is_one_tensor:
            return NOT_ONE_TENSOR
        worst = 0.0
        for trial in self.trials:
            predicted = predict(trial)
            for t, observed in trial.effects.items():
                worst = max(worst, _relative_error(observed, t * predicted))
        return worst

    def output_error(self, predict: Callable[[Trial], torch.Tensor]) -> float:
        """The same for the output itself: is it exactly `predict(trial)` in every trial?"""
        return max(_relative_error(trial.output, predict(trial)) for trial in self.trials)

    def bias_error(self, name: str, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """Does changing the parameter `name` by d change the output by exactly `predict(d, output)`?"""
        trial = self.trials[0]
        bias = trial.tensors[name]
        change = torch.randn(bias.shape, generator=torch.Generator().manual_seed(2), dtype=bias.dtype)
        moved = replace(trial, tensors={**trial.tensors, name: bias + change}, output=[], effects={})
        effect = [a - b for a, b in zip(self._run(moved, trial.weight), trial.output) if _is_float(a)]
        try:
            return _relative_error(effect, predict(change, trial.output[0]))
        except RuntimeError:
            return NOT_ONE_TENSOR

    def exact(self, error: float) -> bool:
        return error <= RELATIVE_TOLERANCE[self.weight.dtype]

    def watch(self, mode: TorchFunctionMode) -> None:
        """Runs the first trial's forward with the module's own weight under `mode`, which sees every torch call."""
        trial = self.trials[0]
        with torch.no_grad(), mode:
            functional_call(
                self.module, {**trial.tensors, self.weight_name: self.weight}, trial.inputs, trial.keywords
            )


def dotted_attribute(module: nn.Module, name: str):
    """getattr along a dotted name: a parameter, a tensor a parametrization computes, an attribute of a submodule."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _relative_error(observed: list, predicted: torch.Tensor | None) -> float:
    if predicted is None or len(observed) != 1 or observed[0].shape != predicted.shape:
        return NOT_ONE_TENSOR
    scale = max(float(predicted.abs().max()), 1e-12)
    return float((observed[0] - predicted).abs().max()) / scale


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _redraw(tensor: torch.Tensor, is_parameter: bool, generator: torch.Generator) -> torch.Tensor:
    """Another plausible value: parameters move by their own spread (or by 1 where they are constant), floating
    buffers (running statistics, masks) keep their signs and scale by a factor in [0.5, 1.5]."""
    if not tensor.is_floating_point():
        return tensor
    noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    if is_parameter:
        spread = float(tensor.std()) if tensor.numel() > 1 else 0.0
        return tensor + noise * (spread if spread > 0 else max(float(tensor.abs().mean()), 1.0))
    return tensor * (1 + 0.5 * torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * noise.sign())


def _train_mode_note(module: nn.Module, inputs: tuple, keywords: dict) -> str:
    """Why outputs of the module in training mode cannot be compared ("" when they can)."""
    copied = copy.deepcopy(module).train()
    before = {name: t.clone() for name, t in copied.state_dict().items()}
    with torch.no_grad():
        first, second = flatten_output(copied(*inputs, **keywords)), flatten_output(copied(*inputs, **keywords))
    if any(not torch.equal(before[name], t) for name, t in copied.state_dict().items()):
        return "its forward changes the module's state in training mode"
    if any(_is_float(a) and not torch.equal(a, b) for a, b in zip(first, second)):
        return "its forward is random in training mode"
    return ""


def _largest_finite(tensors: list[torch.Tensor]) -> float:
    finite = [t[t.isfinite()].abs() for t in tensors]
    return max((float(t.max()) for t in finite if t.numel()), default=0.0)


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


# Below this relative effect of a weight change of the weight's own spread, float32 outputs cannot show an adapter.
VISIBLE_EFFECT = 1e-4
# Below this, what moves is float64 rounding: the output does not depend on the weight at all.
ROUNDING_EFFECT = 1e-12


def run_probe(module: nn.Module, weight: TensorInfo, make_call, example_input: str) -> Probe:
    try:
        probe = build_probe(module, weight.name, make_call)
    except NotDeterministic as exc:
        raise AnalysisError(
            f"{type(module).__name__} cannot be checked: {exc}; lora-scaffold needs a forward it can repeat"
        ) from None
    except USER_CODE_ERRORS as exc:
        raise AnalysisError(
            f"running {type(module).__name__} with a changed {weight.name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    effect = probe.weight_effect() if probe.weight_matters() else 0.0
    if effect < ROUNDING_EFFECT:
        raise WeightUnused(
            f"the output of {type(module).__name__} does not change with {weight.name!r} on input {example_input}; "
            "pick another --weight or pass --example-input"
        )
    if effect < VISIBLE_EFFECT:
        raise AnalysisError(
            f"the output of {type(module).__name__} barely depends on {weight.name!r} on input {example_input} (a change "
            f"of the weight's own size moves it by {effect:.1e} of its scale): no float32 test could see an adapter; "
            "pick another --weight or pass --example-input"
        )
    return probe


def responds(module: nn.Module, weight: TensorInfo, inputs: tuple) -> bool:
    """Does the output move when the weight moves a little (a thousandth of its spread, in a random direction) on
    these inputs? Where a relu zeroes every output, no small change does, and the tests could not see an adapter."""
    current = dotted_attribute(module, weight.name).detach()
    spread = float(current.std()) if current.numel() > 1 and float(current.std()) > 0 else 1.0
    generator = torch.Generator().manual_seed(3)
    change = torch.randn(current.shape, generator=generator, dtype=current.dtype) * spread * 1e-3
    try:
        with torch.no_grad():
            before = flatten_output(module(*inputs))
            after = flatten_output(functional_call(module, {weight.name: current + change}, inputs))
    except USER_CODE_ERRORS:
        return True  # the probe reports what goes wrong
    return any(isinstance(a, torch.Tensor) and not torch.equal(a, b) for a, b in zip(after, before))
