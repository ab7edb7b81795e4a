"""Small models for `scan`: PEFT handles some of their layers, lora-scaffold the others."""

from scaffold_targets import PlainLinear, SquaredConv
from torch import nn


def small_model() -> nn.Module:
    return nn.Sequential(
        SquaredConv(3, 4, 3, padding=1), nn.Flatten(), PlainLinear(4 * 6 * 6, 5), nn.LayerNorm(5), nn.Linear(5, 2)
    )
