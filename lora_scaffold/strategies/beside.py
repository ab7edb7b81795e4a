"""`beside`: a base that keeps its weight quantized (int8 values and a scale, float8, packed integers). LoRA is added
beside the base's own forward, `base(x) + B(A(dropout(x))) * s`, and the base is never touched.

The usual probe moves the weight a little and watches the output; a quantized weight cannot move a little. What
makes the adapter exact here is the base being a linear map of its input (plus a bias): the probe measures that map
in float64 (basis inputs give its matrix) and checks it on random inputs at several scales. Merging would write
W + dW back into the quantized storage, which keeps little of dW: the layer refuses to merge, saying so.
"""

from __future__ import annotations

import copy
import json

import torch

from lora_scaffold.errors import USER_CODE_ERRORS
from lora_scaffold.probe import NOT_ONE_TENSOR, RELATIVE_TOLERANCE
from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


SEEDS = (0, 1, 2)
SCALES = (1.0, -0.5, 3.0)
FEATURE_NAMES = (("in_features", "in_dim", "input_size"), ("out_features", "out_dim", "output_size"))


class Beside(Strategy):
    name = family = "beside"
    help = (
        "a weight stored quantized (int8, float8, packed) in a base linear in its input: adds "
        "lora_B(lora_A(dropout(x))) * scaling beside the base's forward; merging refused"
    )
    summary = (
        "The adapter adds `lora_B(lora_A(dropout(x))) * scaling` beside the base's forward, which it never changes."
    )
    partial = "partials/beside.jinja"
    layer_partial = "partials/beside_layer.jinja"
    needs_probe = False
    adapts_quantized = True
    merges = False
    no_dora = "DoRA rescales the weight, which this base keeps quantized"

    def fits(self, evidence: Evidence) -> bool:
        return evidence.weight.quantized

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        measured = linear_response(evidence)
        if isinstance(measured, str):
            return (Verdict(self, False, NOT_ONE_TENSOR, measured),)
        in_features, out_features, error = measured
        names = feature_attributes(evidence.module, in_features, out_features)
        if names is None:
            note = (
                f"no int attribute of {type(evidence.module).__name__} equals its input size {in_features} and "
                f"its output size {out_features}, which the layer must read at any size"
            )
            return (Verdict(self, False, error, note),)
        matched = error <= RELATIVE_TOLERANCE[torch.float64]
        return (Verdict(self, matched, error, "" if matched else "the output is not linear in the input"),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        return (
            f"{evidence.weight.name} is stored as {evidence.weight.dtype} and the output is a linear map of the input "
            f"({verdict.error_text}): LoRA goes beside the base, whose weight stays as it is"
        )

    def template_answers(self, evidence: Evidence) -> dict:
        in_features, out_features, _ = linear_response(evidence)
        in_name, out_name = feature_attributes(evidence.module, in_features, out_features)
        return {
            "in_features_attribute": json.dumps(in_name),
            "out_features_attribute": json.dumps(out_name),
        }

    def battery_blocker(self, evidence: Evidence) -> str:
        return f"PEFT's battery merges every layer, and merging into {evidence.weight.dtype} storage is refused"


def linear_response(evidence: Evidence) -> tuple[int, int, float] | str:
    """(in features, out features, relative error of the best linear map plus bias) of the base on its own
    input, in float64; or why it cannot be measured."""
    args, kwargs = evidence.call(0)
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return "the base takes more than one floating tensor"
    module = copy.deepcopy(evidence.module).double()  # float tensors only: the quantized storage is kept
    x = args[0].double()
    in_features = x.shape[-1]
    try:
        with torch.no_grad():
            bias = module(torch.zeros(1, in_features, dtype=torch.float64))
            matrix = module(torch.eye(in_features, dtype=torch.float64)) - bias
            errors = []
            for seed in SEEDS:
                sample = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                for scale in SCALES:
                    got = module(sample * scale) - bias
                    expected = (sample * scale) @ matrix
                    errors.append(float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300)))
    except USER_CODE_ERRORS as exc:
        return f"the base does not run on float64 inputs ({type(exc).__name__}: {exc})"
    if not isinstance(bias, torch.Tensor) or bias.dim() != 2:
        return "the base's output is not one tensor of features"
    return in_features, matrix.shape[-1], max(errors)


def feature_attributes(module, in_features: int, out_features: int) -> tuple[str, str] | None:
    """The names of the module's int attributes giving its input and output sizes (the usual names first)."""
    found = []
    for size, usual in zip((in_features, out_features), FEATURE_NAMES):
        names = [n for n in usual if getattr(module, n, None) == size]
        names += sorted(n for n, v in vars(module).items() if type(v) is int and v == size and not n.startswith("_"))
        if not names:
            return None
        found.append(names[0])
    return found[0], found[1]


BESIDE = Beside()
