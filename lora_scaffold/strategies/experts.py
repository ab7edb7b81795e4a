"""`experts`: a weight stacked over experts, `[experts, d1, d2]`, each slice used on its own (Mixtral-style MoE
blocks): one rank-r factor pair per expert, laid out as PEFT's ParamWrapper lays them out."""

from __future__ import annotations

from torch import nn

from lora_scaffold.strategies.base import Evidence, Verdict
from lora_scaffold.strategies.delta import Delta


# Attributes MoE modules keep their expert count in (transformers: num_experts, num_local_experts, n_routed_experts).
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts", "num_total_experts")


class Experts(Delta):
    name = family = "experts"
    help = "a weight stacked over experts [E, d1, d2]: one rank-r pair per expert, the forward runs with W + dW"
    summary = (
        "Forward runs the base module with `W + dW`, where expert e's slice of dW is `B_e @ A_e * scaling` (one "
        "rank-r pair per expert, stored as PEFT's ParamWrapper stores them: lora_A [E * r, d2], lora_B [d1, E * r])."
    )
    fallback = False

    def fits(self, evidence: Evidence) -> bool:
        return len(evidence.weight.shape) == 3 and bool(expert_evidence(evidence.module, evidence.weight.shape[0]))

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        if len(evidence.weight.shape) != 3:
            return (Verdict(self, False, float("inf"), "needs a weight of three dimensions [experts, d1, d2]"),)
        return (Verdict(self, True, 0.0, "exact for any forward, one factor pair per expert"),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        found = expert_evidence(evidence.module, evidence.weight.shape[0]) or "asked for"
        return (
            f"a weight stacked over {evidence.weight.shape[0]} experts ({found}): one rank-r pair per expert, and "
            "the forward runs with W + dW, exact for any forward"
        )

    def template_answers(self, weight_shape: tuple[int, ...]) -> dict:
        return {**super().template_answers(weight_shape), "experts": True}


def expert_evidence(module: nn.Module, count: int) -> str:
    """Why the leading dimension counts experts ("" when nothing says so): an attribute, or the class's name."""
    for name in EXPERT_COUNTS:
        if getattr(module, name, None) == count:
            return f"`{name}` = {count}"
    class_name = type(module).__name__
    if "expert" in class_name.lower() or "moe" in class_name.lower():
        return f"the class is called {class_name}"
    return ""


EXPERTS = Experts()
