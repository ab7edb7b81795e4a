"""`linear`: a weight [out, in] used as `x @ W.T`, or stored [in, out] (PEFT's fan_in_fan_out, GPT-2's Conv1D)."""

from __future__ import annotations

import torch.nn.functional as F

from lora_scaffold.probe import NOT_ONE_TENSOR
from lora_scaffold.strategies.base import AffineStrategy, Evidence, Verdict


class Linear(AffineStrategy):
    name = family = "linear"
    help = "weight [out, in] (or [in, out]) used as x @ W.T: adds lora_B(lora_A(dropout(x))) * scaling"
    summary = "The adapter adds `lora_B(lora_A(dropout(x))) * scaling`, as PEFT's Linear does."
    partial = "partials/linear.jinja"
    declares_fan_in_fan_out = True

    def fits(self, evidence: Evidence) -> bool:
        return len(evidence.weight.shape) == 2

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        return tuple(self._judge_layout(evidence, fan_in_fan_out) for fan_in_fan_out in (False, True))

    def _judge_layout(self, evidence: Evidence, fan_in_fan_out: bool) -> Verdict:
        probe = evidence.probe
        weight = probe.weight
        in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
        if weight.dim() != 2 or not probe.floating_input or probe.x.shape[-1] != in_features:
            note = "input's last dimension is not the weight's input size"
            return self.verdict(NOT_ONE_TENSOR, note, fan_in_fan_out, probe)
        if fan_in_fan_out:
            error = probe.error(lambda trial: trial.x @ trial.delta)
        else:
            error = probe.error(lambda trial: F.linear(trial.x, trial.delta))
        return self.verdict(error, "", fan_in_fan_out, probe)

    def base_output(self, evidence, verdict, x, weight, bias):
        return F.linear(x, weight.T if verdict.fan_in_fan_out else weight, bias)

    def bias_size(self, weight_shape, fan_in_fan_out, groups):
        return weight_shape[1] if fan_in_fan_out else weight_shape[0]

    def bias_change(self, evidence, change, output):
        return change.expand_as(output)

    def dora_variant(self, weight_shape):
        return "DoraLinearVariant"

    def dora_norm_dims(self, weight_shape, fan_in_fan_out):
        return "0" if fan_in_fan_out else "1"


LINEAR = Linear()
