"""`delta`: any weight, any forward: the module's own forward runs with `W + (B @ A).reshape(W.shape) * scaling`."""

from __future__ import annotations

from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


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
        return "the forward runs with W + dW, exact for any forward"


DELTA = Delta()
