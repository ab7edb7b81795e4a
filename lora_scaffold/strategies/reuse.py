"""`reuse`: a subclass of a type PEFT supports, whose output is still exactly its parent's, gets a thin subclass of
PEFT's own layer (DoRA and every other option included)."""

from __future__ import annotations

from torch import nn

from lora_scaffold.probe import NOT_ONE_TENSOR
from lora_scaffold.strategies.base import Evidence, Strategy, Verdict
from lora_scaffold.strategies.conv import CONV
from lora_scaffold.strategies.linear import LINEAR


# PEFT's own layers, by the base class they adapt; a generated layer for these overrides PEFT's when registered.
PEFT_BUILTINS = {
    nn.Linear: "Linear",
    nn.Embedding: "Embedding",
    nn.Conv1d: "Conv1d",
    nn.Conv2d: "Conv2d",
    nn.Conv3d: "Conv3d",
    nn.MultiheadAttention: "MultiheadAttention",
}
# Parent classes whose PEFT layer a subclass can reuse, with the strategy the probe must confirm.
REUSABLE = {nn.Linear: LINEAR, nn.Conv1d: CONV, nn.Conv2d: CONV, nn.Conv3d: CONV}
NOT_REUSABLE = (
    "needs a subclass of nn.Linear, or of nn.Conv1d/2d/3d keeping its constructor, with groups=1 and dilation=1, "
    "adapting `weight`"
)


class Reuse(Strategy):
    name = family = "reuse"
    help = "a subclass of nn.Linear/nn.ConvNd whose math is its parent's: a thin subclass of PEFT's own layer"
    summary = "PEFT's own layer for the parent class."
    partial = layer_partial = "partials/reuse_layer.jinja"
    peft_own_layer = True
    refines = True

    def fits(self, evidence: Evidence) -> bool:
        return self.parent_strategy(evidence) is not None

    def parent_strategy(self, evidence: Evidence):
        """The strategy PEFT's layer for a parent of the target implements, when that layer can serve it unchanged.

        PEFT's conv layers build lora_A as `type(base_layer)(in, r, kernel, stride, padding)`: the subclass must
        keep its parent's constructor, and dilation and groups must be 1 (PEFT ignores dilation and cannot merge
        groups)."""
        cls, attributes = type(evidence.module), evidence.attributes
        if evidence.weight.name != "weight":
            return None
        for base, strategy in REUSABLE.items():
            if cls is base or not issubclass(cls, base):
                continue
            if strategy is CONV:
                dilation = attributes.get("dilation", 1)
                dilations = set(dilation if isinstance(dilation, tuple) else (dilation,))
                if cls.__init__ is not base.__init__ or attributes.get("groups") != 1 or dilations != {1}:
                    return None
            return strategy
        return None

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        """PEFT's layer assumes the parent's output exactly: DoRA rescales `output - bias`, and PEFT's conv LoRA
        ignores padding_mode, so the weight acting as in the parent is not enough."""
        parent = self.parent_strategy(evidence)
        if parent is None:
            return (Verdict(self, False, NOT_ONE_TENSOR, NOT_REUSABLE),)
        weight_map = next((v for v in parent.judge(evidence) if not v.fan_in_fan_out), None)
        if weight_map is None or not weight_map.matched:
            found = weight_map.describe() if weight_map else "no verdict"
            return (Verdict(self, False, NOT_ONE_TENSOR, f"the weight does not act as {parent.name} ({found})"),)
        error, note = parent.base_map_error(evidence, weight_map)
        if not evidence.probe.exact(error):
            found = note or f"differs by {error:.1e} (relative)"
            return (Verdict(self, False, error, f"needs the parent's forward, and the output {found} from it"),)
        return (Verdict(self, True, weight_map.relative_error, parent.name),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        return (
            f"a subclass whose weight still acts as in its parent (probe: {verdict.note}, {verdict.error_text}), "
            f"so PEFT's own lora.{peft_builtin(type(evidence.module))} is reused"
        )

    def dora_blocker(self, evidence: Evidence, verdict: Verdict) -> str:
        return ""

    def bias_size(self, weight_shape, fan_in_fan_out, groups):
        return weight_shape[0]

    def bias_change(self, evidence, change, output):
        return self.parent_strategy(evidence).bias_change(evidence, change, output)


def peft_builtin(cls: type, exact: bool = False) -> str | None:
    """PEFT's own layer for `cls` (exact: for `cls` itself, not for one of its base classes)."""
    for base, name in PEFT_BUILTINS.items():
        if cls is base or (not exact and issubclass(cls, base)):
            return name
    candidates = cls.__mro__[:1] if exact else cls.__mro__
    if any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in candidates):
        return "Linear"
    return None


def peft_layer_unchanged(cls: type) -> bool:
    """PEFT's own layer serves `cls` exactly as it serves the PEFT type it derives from: `cls` is that type, or keeps
    its forward (MultiheadAttention's `out_proj`, a NonDynamicallyQuantizableLinear) and, for a convolution, whose
    LoRA factors PEFT builds by calling `type(base_layer)`, its constructor too."""
    if peft_builtin(cls, exact=True):
        return True
    base = next((b for b in PEFT_BUILTINS if issubclass(cls, b)), None)
    if base is None or cls.forward is not base.forward:
        return False
    return cls.__init__ is base.__init__ or REUSABLE.get(base) is not CONV


REUSE = Reuse()
