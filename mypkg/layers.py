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


class TokenEmbedding(nn.Module):
    """A lookup table written from scratch (not an nn.Embedding subclass): PEFT's dispatcher does not recognise it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)


class Int8WeightOnlyLinear(nn.Module):
    """Weight-only int8 quantization in its common layout: an int8 `qweight` buffer and a float scale per row."""

    def __init__(self, in_features: int = 6, out_features: int = 5, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.randn(out_features, in_features) * 0.2
        scale = weight.abs().amax(dim=1) / 127
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype) * self.scale[:, None].to(x.dtype), self.bias)
