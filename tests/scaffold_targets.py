"""Small target modules for the tests: layers PEFT cannot adapt, and modules that must be refused."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class SquaredConv(nn.Conv2d):
    """Subclasses nn.Conv2d, but its forward is not linear in the weight: no factored path may be chosen."""

    def forward(self, x):
        weight = self.weight * self.weight.abs()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CountingLinear(nn.Linear):
    """A subclass whose forward still computes its parent's: PEFT's own lora.Linear can serve it (reuse)."""

    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        return super().forward(x)


class TracedConv2d(nn.Conv2d):
    """Same for nn.Conv2d: keeps the parent's constructor and math."""

    def forward(self, x):
        return super().forward(x)


class ScaledConv(nn.Conv2d):
    """Linear in the weight but scales its output, so the conv formula does not hold."""

    def forward(self, x):
        return 3.0 * super().forward(x)


class NormalizedLinear(nn.Linear):
    """Normalises its weight rows before use."""

    def forward(self, x):
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


class OffsetLinear(nn.Linear):
    """Linear in its weight, but adds a constant besides the bias: LoRA fits, PEFT's Linear and DoRA do not."""

    def forward(self, x):
        return super().forward(x) + 0.5


class IgnoresBias(nn.Module):
    """x @ W.T: its bias (zeros, as often initialised) is never used, which only a non-zero bias reveals."""

    def __init__(self, in_features: int = 5, out_features: int = 7):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return x @ self.weight.T


class BiaslessLinear(nn.Module):
    """x @ W.T with no `bias` attribute at all, which PEFT's DoRA reads."""

    def __init__(self, in_features: int = 5, out_features: int = 7):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x):
        return x @ self.weight.T


class PlainLinear(nn.Module):
    """A linear layer PEFT does not recognise (no nn.Linear base)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class NestedConv(nn.Module):
    """Its only weight sits in a child module: conv.weight."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 5, 3, padding=1)
        self.gate = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return torch.tanh(self.conv(x)) * self.gate[:, None, None]


class RequiredArgs(nn.Module):
    """Constructor arguments the generator cannot guess."""

    def __init__(self, width, depth, *, scale=1.0):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(depth, width))
        self.scale = scale

    def forward(self, x):
        return (x @ self.proj.T) * self.scale


class TwoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.randn(6, 4))
        self.down = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return (x @ self.up.T) @ self.down.T


class OnlyBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(4, 4))

    def forward(self, x):
        return x @ self.table


class NoParameters(nn.Module):
    def forward(self, x):
        return x


class RaisingCtor(nn.Module):
    def __init__(self, size: int = 3):
        super().__init__()
        raise RuntimeError("size must be even")


class IgnoresWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x * 2


class RoundsAwayWeight(nn.Module):
    """The weight moves the output by float64's rounding only: it adds and takes away the same sum."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return (x + self.weight.sum()) - self.weight.sum()


class MaskedOutput(nn.Module):
    """Half its output masked to -inf, as attention scores are: the other half depends on the weight in full."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.cat([x @ self.weight.T, torch.full_like(x, -math.inf)], dim=-1)


class HugeEmbedding(nn.Embedding):
    """Default arguments that would allocate 1.6 GB if built on the CPU."""

    def __init__(self, num_embeddings: int = 50_000, embedding_dim: int = 8_192):
        super().__init__(num_embeddings, embedding_dim)


class HugeLegacyLinear(nn.Module):
    """The pre-1.0 idiom at a size that would take 1.6 GB: an uninitialised torch.Tensor, filled in place by init."""

    def __init__(self, in_features: int = 50_000, out_features: int = 8_192):
        super().__init__()
        self.weight = nn.Parameter(torch.Tensor(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class WideGroupedConv(nn.Module):
    """Large defaults with structure to keep: channels must stay divisible by groups."""

    def __init__(self, channels: int = 4800, groups: int = 12):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, groups=groups)

    def forward(self, x):
        return self.conv(x)


NOT_A_MODULE = 42


class NotAModule:
    pass


class GainLinear(nn.Module):
    """x @ W.T times a gain initialised to ones: only a random gain shows that LoRA's linear path is wrong."""

    def __init__(self, in_features: int = 5, out_features: int = 7):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.gain = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return (x @ self.weight.T) * self.gain


class GainConv(nn.Conv2d):
    """A convolution times a per-channel gain of ones."""

    def __init__(self, in_channels: int = 3, out_channels: int = 5, kernel_size: int = 3, padding: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1))

    def forward(self, x):
        return super().forward(x) * self.gain


class ReluLinear(nn.Linear):
    """relu(x @ W.T + b): linear on the inputs where the pre-activation is positive, which one draw may hit."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class DropoutLinear(nn.Linear):
    """Dropout inside the forward: random in training mode, linear in eval mode."""

    def forward(self, x):
        return F.dropout(super().forward(x), p=0.5, training=self.training)


class PairOutputLinear(nn.Linear):
    """Returns (x @ W.T + b, None), as IBert's QuantLinear does outside its quantized mode: the float part is linear,
    but an adapter added to the output would be added to a tuple."""

    def forward(self, x):
        return F.linear(x, weight=self.weight, bias=self.bias), None


class NoisyLinear(nn.Linear):
    """Random even in eval mode: nothing can be checked against it."""

    def forward(self, x):
        return super().forward(x) + torch.randn(x.shape[0], self.out_features)


class ScalarWeight(nn.Module):
    """A 0-d weight: no low-rank adapter fits it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.weight


class ExitingForward(nn.Linear):
    """User code that ends the process: it must become an error message."""

    def forward(self, x):
        raise SystemExit(0)


class ScalarOutput(nn.Linear):
    """Sums its output to a 0-d tensor: no batch dimension to test with."""

    def forward(self, x):
        return super().forward(x).sum()


class SpectralLinear(nn.Linear):
    """A Linear under spectral_norm: its training-mode forward updates a buffer (the power iteration's u)."""

    def __init__(self, in_features: int = 5, out_features: int = 7):
        super().__init__(in_features, out_features)
        torch.nn.utils.spectral_norm(self)


class OrthogonalLinear(nn.Linear):
    """A Linear whose weight torch's orthogonal parametrization computes: its right_inverse takes back only
    orthogonal matrices, so W + dW cannot be merged into it."""

    def __init__(self, in_features: int = 6, out_features: int = 6):
        super().__init__(in_features, out_features)
        torch.nn.utils.parametrizations.orthogonal(self)


class NoBfloat16(nn.Linear):
    """A layer whose kernels lack bfloat16, as some custom CUDA or CPU kernels do."""

    def forward(self, x):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("\"addmm\" not implemented for 'BFloat16'")
        return super().forward(x)


class Config(nn.Linear):
    """A class named like a configuration object."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class WeightNormLinear(nn.Linear):
    """An nn.Linear that applies weight_norm to itself: torch swaps its class for a parametrized subclass, and
    its parameters become `parametrizations.weight.original0` (the magnitude) and `original1` (the direction)."""

    def __init__(self, in_features: int = 5, out_features: int = 7):
        super().__init__(in_features, out_features)
        torch.nn.utils.parametrizations.weight_norm(self)


class EmptyInitExperts(nn.Module):
    """Like transformers' MixtralExperts: expert weights left as torch.empty for the model's init to fill."""

    def __init__(self, num_experts: int = 3, in_features: int = 6, out_features: int = 5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.scale = nn.Parameter(torch.empty(num_experts, 1, out_features))
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight) * self.scale


class RowBankExperts(nn.Module):
    """Experts kept one a row, [experts, intermediate * hidden], each viewed as [intermediate, hidden] in the forward:
    which matrix a row is only the forward shows; `hidden_size` gives its columns."""

    def __init__(self, num_experts: int = 3, hidden_size: int = 6, intermediate_size: int = 5):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.weight = nn.Parameter(torch.randn(num_experts, intermediate_size * hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.intermediate_size)
        for expert in range(self.num_experts):
            chosen = expert_index == expert
            out[chosen] = x[chosen] @ self.weight[expert].view(self.intermediate_size, self.hidden_size).T
        return out


class TransposedRowBankExperts(RowBankExperts):
    """The same bank with each row viewed as [hidden, intermediate] (an attribute then gives the rows), through one
    view of the whole weight."""

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        matrices = self.weight.view(self.num_experts, self.hidden_size, -1)
        return torch.einsum("th,thi->ti", x, matrices[expert_index])


class UnsizedRowBankExperts(RowBankExperts):
    """A bank whose row shape no attribute gives (its sizes are not kept): stays delta."""

    def __init__(self):
        super().__init__()
        self.rows_and_columns = (self.intermediate_size, self.hidden_size)
        del self.hidden_size, self.intermediate_size

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        rows, columns = self.rows_and_columns
        return torch.einsum("th,tih->ti", x, self.weight.view(self.num_experts, rows, columns)[expert_index])


class ReluPair(nn.Module):
    """A linear map, a relu and two outputs: on torch.randn(2, 8) the relu zeroes every output (seeded), so no
    adapter could show in it; the input is inferred where the output depends on the weight."""

    def __init__(self, in_features: int = 8, out_features: int = 2):
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)

    def forward(self, x):
        hidden = F.relu(self.lin(x))
        return hidden, hidden.sum(-1)


class Float8Linear(nn.Module):
    """A frozen float8 weight, computed in the input's dtype."""

    def __init__(self, in_features: int = 6, out_features: int = 5):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = (torch.randn(out_features, in_features) * 0.2).to(torch.float8_e4m3fn)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))
