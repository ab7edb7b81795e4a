"""Target classes whose names generated code also uses: they must be imported under another name."""

import torch
import torch.nn.functional as F
from torch import nn


class LoraConfig(nn.Module):
    """A plain linear layer that happens to share PEFT's config class's name."""

    def __init__(self, in_features: int = 5, out_features: int = 7):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Linear(nn.Linear):
    """A subclass of nn.Linear named like PEFT's own layer, which the reuse strategy subclasses."""


class Wrapper(nn.Conv1d):
    """Named like the generated tests' model class; its forward is not its parent's (delta)."""

    def forward(self, x):
        return torch.tanh(super().forward(x))
