"""`delta`: any weight, any forward: the module's own forward runs with `W + (B @ A).reshape(W.shape) * scaling`,
or, where the proof in lora_scaffold/factored.py holds, with W as it is and LoRA's low-rank path added to each
product of an input with it."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from lora_scaffold import factored
from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


# The proofs run per built module and strategy: analysis asks for the reason and the dtype.
_PROOFS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[bool, str]]] = weakref.WeakKeyDictionary()


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
    stacks = True
    no_dora = "DoRA rescales a weight acting as a linear map or a convolution, and the probe found neither"

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        return (Verdict(self, True, 0.0, "exact for any forward"),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        proven, found = self.factored_path(evidence)
        if proven:
            return f"the forward runs with W + dW, exact for any forward; in training {found}"
        return (
            f"the forward runs with W + dW, exact for any forward ({found}: no factored path)"
            if found
            else ("the forward runs with W + dW, exact for any forward")
        )

    def factored_dtype(self, evidence: Evidence) -> str:
        return str(proof_dtype(evidence)).removeprefix("torch.") if self.factored_path(evidence)[0] else ""

    def changed_shape(self, evidence: Evidence) -> tuple[int, ...] | None:
        """How the layer lays out the change of the weight for the factored path's proof: None for `delta`'s own
        [out, in * ...] (B @ A, reshaped to the weight's shape), or [experts, d1, d2] (one pair per expert)."""
        return None

    def unfactored(self, evidence: Evidence) -> str:
        """Why the factored path is not tried for this weight ("" when it is)."""
        return ""

    def factored_path(self, evidence: Evidence) -> tuple[bool, str]:
        """(whether the layer takes the factored path, what the proof found; "" where it was not tried: a computed
        weight, which the forward never reads as the parameter itself, or a quantized one)."""
        if evidence.call is None or evidence.weight.computed or evidence.weight.quantized:
            return False, ""
        if why_not := self.unfactored(evidence):
            return False, why_not
        proofs = _PROOFS.setdefault(evidence.module, {})
        if self.name not in proofs:
            proofs[self.name] = factored.factored_proof(
                evidence.module,
                evidence.weight.name,
                evidence.call,
                self.changed_shape(evidence),
                proof_dtype(evidence),
            )
        return proofs[self.name]


def proof_dtype(evidence: Evidence) -> torch.dtype:
    """The probe's: float64 where the module runs in it, else float32."""
    return evidence.probe.weight.dtype if evidence.probe is not None else torch.float64


DELTA = Delta()
