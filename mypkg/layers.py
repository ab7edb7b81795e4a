import torch
import torch.nn.functional as F
from torch import nn


class MyConv(nn.Module):
    """A 2-D convolution written from scratch: PEFT's dispatcher does not recognise it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = (1, 1)
        self.padding = (padding, padding)
        self.dilation = (1, 1)
        self.groups = 1
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * 0.1)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
