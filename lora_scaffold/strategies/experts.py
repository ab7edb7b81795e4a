"""`experts`: a weight that holds several experts' matrices, each used on its own (MoE blocks): stacked
`[experts, d1, d2]` (Mixtral), or flattened along its rows `[experts * d1, d2]` with the expert count in an attribute
(DBRX). One rank-r factor pair per expert, laid out as PEFT's ParamWrapper lays them out."""

from __future__ import annotations

from torch import nn

from lora_scaffold.probe import dotted_attribute
from lora_scaffold.strategies.base import Evidence, Verdict
from lora_scaffold.strategies.delta import Delta


# Attributes MoE modules keep their expert count in (transformers: num_experts, num_local_experts, n_routed_experts,
# DBRX's moe_num_experts).
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts", "moe_num_experts")


class Experts(Delta):
    name = family = "experts"
    help = (
        "a weight of several experts, [E, d1, d2] or [E * d1, d2]: one rank-r pair per expert, the forward runs with "
        "W + dW"
    )
    summary = (
        "Forward runs the base module with `W + dW`, where expert e's slice of dW is `B_e @ A_e * scaling` (one "
        "rank-r pair per expert, stored as PEFT's ParamWrapper stores them: lora_A [E * r, d2], lora_B [d1, E * r])."
    )
    fallback = False

    def fits(self, evidence: Evidence) -> bool:
        shape = evidence.weight.shape
        if len(shape) == 3:
            return bool(expert_evidence(evidence.module, shape[0]))
        return len(shape) == 2 and bool(flattened_expert_count(evidence.module, evidence.weight.name, shape))

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        shape = evidence.weight.shape
        if len(shape) == 3 or (
            len(shape) == 2 and flattened_expert_count(evidence.module, evidence.weight.name, shape)
        ):
            return (Verdict(self, True, 0.0, "exact for any forward, one factor pair per expert"),)
        return (
            Verdict(
                self,
                False,
                float("inf"),
                "needs a weight [experts, d1, d2], or [experts * d1, d2] with the expert count in an attribute",
            ),
        )

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        shape = evidence.weight.shape
        if len(shape) == 2:
            attribute = flattened_expert_count(evidence.module, evidence.weight.name, shape)
            count = dotted_attribute(evidence.module, attribute)
            found = f"{count} experts' [{shape[0] // count}, {shape[1]}] slices along its rows (`{attribute}`)"
        else:
            found = f"{shape[0]} experts ({expert_evidence(evidence.module, shape[0]) or 'asked for'})"
        return (
            f"a weight stacking {found}: one rank-r pair per expert, and the forward runs with W + dW, exact for "
            "any forward"
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


def flattened_expert_count(module: nn.Module, weight_name: str, shape: tuple[int, ...]) -> str:
    """The attribute (dotted, from the target) giving the expert count E of a weight [E * d1, d2], d1 > 1, found
    on the target or on the module that holds the weight ("" when none does)."""
    owner = weight_name.rpartition(".")[0]
    for prefix in dict.fromkeys(("", owner)):
        holder = module.get_submodule(prefix)
        for name in EXPERT_COUNTS:
            count = getattr(holder, name, None)
            if isinstance(count, int) and count > 1 and shape[0] % count == 0 and shape[0] // count > 1:
                return f"{prefix}.{name}" if prefix else name
    return ""


EXPERTS = Experts()
