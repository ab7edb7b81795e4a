"""`embedding`: a lookup table [num, dim] indexed by integer inputs."""

from __future__ import annotations

import torch.nn.functional as F

from lora_scaffold.probe import NOT_ONE_TENSOR
from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


class Embedding(Strategy):
    name = family = "embedding"
    help = "lookup table [num, dim]: adds the looked-up rows of (B @ A).T * scaling"
    summary = "The adapter adds the looked-up rows of `(B @ A).T * scaling`, as PEFT's Embedding does."
    partial = "partials/embedding.jinja"
    uses_dropout = False  # as PEFT's Embedding: dropout does not apply to indices
    refused_options = {"lora_bias": "embeddings have no bias to merge it into"}
    no_dora = "lora-scaffold does not generate DoRA for embeddings yet"

    def fits(self, evidence: Evidence) -> bool:
        return len(evidence.weight.shape) == 2

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        probe = evidence.probe
        x = probe.x
        if probe.weight.dim() != 2 or not hasattr(x, "is_floating_point") or x.is_floating_point():
            return (self.verdict(NOT_ONE_TENSOR, "input is not integer indices into a 2-D weight", probe=probe),)
        padding_idx = evidence.attributes.get("padding_idx")
        try:
            error = probe.error(lambda trial: F.embedding(trial.x, trial.delta, padding_idx=padding_idx))
        except (IndexError, RuntimeError):
            return (self.verdict(NOT_ONE_TENSOR, "input is not indices into the weight's rows", probe=probe),)
        return (self.verdict(error, probe=probe),)

    def dora_norm_dims(self, weight_shape: tuple[int, ...], fan_in_fan_out: bool) -> str:
        """PEFT's DoRA for embeddings keeps one magnitude per embedding dimension: the norm runs over the rows."""
        return "(0,)"

    def imports(self, answers):
        return [("torch.nn.functional as F", ())]


EMBEDDING = Embedding()
