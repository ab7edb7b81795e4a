"""`delta`: any weight, any forward: the module's own forward runs with `W + (B @ A).reshape(W.shape) * scaling`,
or, where the proof in lora_scaffold/factored.py holds, with W as it is and LoRA's low-rank path added to each
F.linear of it."""

from __future__ import annotations

import weakref

from torch import nn

from lora_scaffold import factored
from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


# One proof per built module: analysis asks for the reason and the template answers.
_PROOFS: weakref.WeakKeyDictionary[nn.Module, tuple[bool, str]] = weakref.WeakKeyDictionary()


class Delta(Strategy):
    name = family = "delta"
    help = "any weight, any forward: runs the module's own forward with W + (B @ A).reshape(W.shape) * scaling"
    summary = "Forward runs the base module with `W + (B @ A).reshape(W.shape) * scaling`."
    partial = "partials/delta.jinja"
    mixed_batch = False  # its adapters change the weight itself, which is one for the whole batch
    refused_options = {"lora_bias": "this layer's adapters change the weight only"}
    fallback = True  # what auto takes when no factored path is exact
    adapts_computed_weights = True
    caches_weight = True
    no_dora = "DoRA rescales a weight acting as a linear map or a convolution, and the probe found neither"

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        return (Verdict(self, True, 0.0, "exact for any forward"),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        proven, found = factored_path(evidence)
        if proven:
            return f"the forward runs with W + dW, exact for any forward; in training {found}"
        return (
            f"the forward runs with W + dW, exact for any forward ({found}: no factored path)"
            if found
            else ("the forward runs with W + dW, exact for any forward")
        )

    def template_answers(self, evidence: Evidence) -> dict:
        # The mode's source goes in the layer module (render's `factored_source`) where this is set.
        return {"factored_uses": "True" if factored_path(evidence)[0] else ""}

    def imports(self, answers: dict) -> list[tuple[str, tuple[str, ...]]]:
        if not answers.get("factored_uses"):
            return []
        return [("torch.overrides", ("TorchFunctionMode",)), ("torch.nn.functional as F", ())]


def factored_path(evidence: Evidence) -> tuple[bool, str]:
    """(whether the layer takes the factored path, what the proof found; "" where it was not tried: a computed
    weight, which the forward never reads as the parameter itself)."""
    if evidence.call is None or evidence.weight.computed or evidence.weight.quantized:
        return False, ""
    if evidence.module not in _PROOFS:
        _PROOFS[evidence.module] = factored.factored_proof(evidence.module, evidence.weight.name, evidence.call)
    return _PROOFS[evidence.module]


DELTA = Delta()
