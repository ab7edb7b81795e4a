"""What a strategy is: everything about one way of applying LoRA to a weight, in one place.

A strategy module defines one `Strategy` subclass and the registry (`strategies/__init__.py`) lists an instance of
it. The generated layer is `partials/full_layer.jinja` plus the strategy's partial (`partial`), except for `reuse`,
which subclasses PEFT's own layer. The partial implements these hooks, which full_layer calls:

- `_get_in_out_features(module)`: the sizes lora_A reads and lora_B writes (PEFT reads them too);
- `_create_lora_factors(adapter_name, r, lora_bias)`: create the adapter's lora_A/lora_B (or lora_embedding_A/B);
- `_lora_factors(adapter)`: the adapter's A and B as tensors, and `_compose(A, B)`: `B @ A` laid out like the
  adapted weight (full_layer scales it, handles dtypes, merges and unmerges it);
- `forward(x, *args, **kwargs)`: usually `partials/factored_forward.jinja`, which needs `_lora_output(adapter, x)`,
  what the adapter adds to the base output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_scaffold.introspect import TensorInfo
from lora_scaffold.probe import NOT_ONE_TENSOR, Probe


@dataclass(frozen=True)
class Evidence:
    """What a strategy judges: the built module, the weight, its attributes and the probe (None for stub)."""

    module: nn.Module
    weight: TensorInfo
    attributes: dict
    probe: Probe | None
    call: Callable[[int], tuple[tuple, dict]] | None = None  # seed -> the (args, kwargs) the target is called with
    build: Callable[[], nn.Module] | None = None  # a fresh module, as the tests build it


@dataclass(frozen=True)
class Verdict:
    """What the probe says of one strategy (one layout of it) for the target."""

    strategy: Strategy
    matched: bool
    relative_error: float
    note: str = ""
    fan_in_fan_out: bool = False

    @property
    def label(self) -> str:
        return f"{self.strategy.name} (weight stored [in, out])" if self.fan_in_fan_out else self.strategy.name

    def describe(self) -> str:
        if self.note:
            return self.note
        if math.isinf(self.relative_error):
            return "the output is not one tensor of the predicted shape"
        return f"differs by {self.relative_error:.1e} (relative)"

    @property
    def rounded_error(self) -> float | None:
        """The error as records and reasons show it: a match only as the power of ten it stays under (its last
        bits differ between CPUs, and records are golden files), a mismatch to two digits."""
        if math.isinf(self.relative_error):
            return None
        if self.matched:
            return 0.0 if self.relative_error == 0 else 10.0 ** math.ceil(math.log10(self.relative_error))
        return float(f"{self.relative_error:.1e}")

    @property
    def error_text(self) -> str:
        return f"relative error at most {self.rounded_error:.0e}" if self.matched else self.describe()

    def as_record(self) -> dict[str, Any]:
        return {
            "strategy": self.label,
            "matched": self.matched,
            "relative_error": self.rounded_error,
            "note": self.note,
        }


class Strategy:
    name = ""
    family = ""  # the --strategy choice that asks for it (conv covers transposed convs)
    help = ""  # one line for --help: what it fits and what the adapter adds
    summary = ""  # one sentence for the layer's docstring: what the adapter adds
    partial = ""  # its template under templates/partials/
    tried_by_auto = True
    needs_probe = True
    mixed_batch = True  # forward takes `adapter_names` (several adapters in one batch)
    uses_dropout = True
    caches_weight = False  # its eval forward keeps W + dW between calls (delta): the tests check the cache follows
    # Its layer runs the base with W + dW, so it stacks on another such layer of the module, for another weight
    stacks = False
    declares_fan_in_fan_out = False  # the layer class says how its weight is stored, which PEFT's DoRA reads
    refused_options: dict[str, str] = {}  # LoraConfig options the layer refuses, and why
    no_dora = ""  # why the strategy never offers DoRA
    peft_own_layer = False  # the layer is PEFT's own (reuse), which supports every option PEFT has
    fallback = False
    refines = False  # it only narrows another strategy down (reuse): the fallback's reason leaves its verdicts out
    # Merges into a weight a parametrization computes (weight_norm's `weight`), through the parametrization's
    # right_inverse; the others write the weight's `.data`, which such a weight does not keep.
    adapts_computed_weights = False
    # Adapts a weight stored quantized (int8, float8, packed), which the others would write W + dW into and lose.
    adapts_quantized = False
    merges = True  # merge() writes the adapter into the base weight; otherwise it refuses, saying why
    layer_partial = "partials/full_layer.jinja"  # the layer class its partial goes into

    def fits(self, evidence: Evidence) -> bool:
        """Whether `auto` tries it on this target."""
        return True

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        raise NotImplementedError

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        return f"the probe shows the weight acts as {verdict.label} ({verdict.error_text})"

    def settles(self, evidence: Evidence) -> str:
        """Why the tests first run the base once in eval mode, whose first forward changes its state ("" when
        nothing does)."""
        return ""

    def eval_only(self, evidence: Evidence) -> str:
        """Why the tests must compare outputs in eval mode only, where the strategy runs no probe to say so."""
        return ""

    def tolerant_merge(self, evidence: Evidence) -> bool:
        """Whether a layer that does not merge exactly (`merges = False`) merges where the loss is within a
        tolerance the user can raise, rather than refusing always."""
        return False

    def lacks_quantization_backend(self, evidence: Evidence) -> bool:
        """Whether the base is quantized and PEFT has no QuantizationBackend for it (patch mode on peft 0.21 then
        writes one)."""
        return False

    def factored_dtype(self, evidence: Evidence) -> str:
        """Where the layer runs its base with W as it is and adds the low-rank term to each product with W
        (lora_scaffold/factored.py): the dtype the proof held in; "" where it runs without that proof."""
        return ""

    def battery_blocker(self, evidence: Evidence) -> str:
        """Why PEFT's custom-model battery cannot run on the generated layer, for the strategy's sake ("" if it can)."""
        return ""

    def dora_blocker(self, evidence: Evidence, verdict: Verdict) -> str:
        """Why PEFT's DoRA variant cannot serve the generated layer ("" when it can)."""
        return self.no_dora

    def bias_size(self, weight_shape: tuple[int, ...], fan_in_fan_out: bool, groups: int) -> int | None:
        """The size of a bias that lora_bias merges into; None when the strategy has no such bias."""
        return None

    def bias_change(self, evidence: Evidence, change: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What changing that bias by `change` must do to the output, for lora_bias to merge into it."""
        raise NotImplementedError

    def groups(self, attributes: dict) -> int:
        return 1

    def test_rank(self, groups: int) -> int:
        """The LoRA rank the generated tests use."""
        return 4

    def dora_variant(self, weight_shape: tuple[int, ...]) -> str:
        return ""

    def dora_norm_dims(self, weight_shape: tuple[int, ...], fan_in_fan_out: bool) -> str:
        """The weight dimensions DoRA's norm runs over (all but the output one), as a literal."""
        return str(tuple(range(1, len(weight_shape))))

    def template_answers(self, evidence: Evidence) -> dict[str, Any]:
        """What only this strategy's partials read (`strategy_answers.NAME` there), worked out once by analysis
        and carried by the plan as they are: nothing outside the strategy and its partials reads them."""
        return {}

    def imports(self, answers: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
        """What its partial needs imported, beyond what every full layer imports, given its template answers."""
        return []

    def verdict(self, error: float, note: str = "", fan_in_fan_out: bool = False, probe: Probe | None = None):
        matched = probe is not None and probe.exact(error)
        return Verdict(self, matched, error, note, fan_in_fan_out)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


class AffineStrategy(Strategy):
    """A strategy whose weight acts as a linear map (or convolution) that PEFT's DoRA and PEFT's own layers know.

    PEFT's DoRA variants read `base_layer.weight` and `base_layer.bias` and take the base output to be the weight's
    map plus that bias; `base_map_error` checks exactly that on the real module."""

    def base_output(self, evidence: Evidence, verdict: Verdict, x, weight, bias):
        raise NotImplementedError

    def base_map_error(self, evidence: Evidence, verdict: Verdict) -> tuple[float, str]:
        """Is the output exactly the weight's map plus `bias` in every trial (whose biases are random)?"""
        probe = evidence.probe
        bias = getattr(probe.module, "bias", None)
        if not probe.floating_input or not (bias is None or isinstance(bias, torch.Tensor)):
            return NOT_ONE_TENSOR, "no floating input, or a bias that is not a tensor"

        def predict(trial):
            trial_bias = None if bias is None else trial.tensors["bias"]
            return self.base_output(evidence, verdict, trial.x, trial.weight, trial_bias)

        try:
            return probe.output_error(predict), ""
        except Exception as exc:
            return NOT_ONE_TENSOR, f"{type(exc).__name__}: {exc}"

    def dora_blocker(self, evidence: Evidence, verdict: Verdict) -> str:
        name = type(evidence.module).__name__
        if evidence.weight.name != "weight":
            return f"PEFT's DoRA reads `base_layer.weight`, and this layer adapts `{evidence.weight.name}`"
        bias = getattr(evidence.module, "bias", False)
        if bias is not None and not isinstance(bias, torch.Tensor):
            return f"PEFT's DoRA reads `base_layer.bias`, and {name} has no bias tensor (nor `bias = None`)"
        if self.groups(evidence.attributes) != 1:
            return f"PEFT's DoRA composes B @ A ungrouped, and this convolution has groups={self.groups(evidence.attributes)}"
        error, note = self.base_map_error(evidence, verdict)
        if not evidence.probe.exact(error):
            found = note or f"differs by {error:.1e} (relative)"
            return (
                f"PEFT's DoRA takes the output to be the weight's {self.name} map plus the bias, and {name}'s {found}"
            )
        return ""
