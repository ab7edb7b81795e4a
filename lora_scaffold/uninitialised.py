"""Parameters a constructor leaves as `torch.empty`: uninitialised memory (garbage, NaN, or zeros by chance).

Hugging Face's MixtralExperts and its kind do this and leave the values to the model's `post_init`. Built alone, as
the probe and the generated tests build them, those parameters are filled the way that init fills them (normal,
std 0.02), so that every run sees the same finite weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


EMPTY_FACTORIES = frozenset({torch.empty, torch.empty_like, torch.empty_strided, torch.Tensor.new_empty})
INIT_STD = 0.02


class EmptyTracker(TorchFunctionMode):
    """The storages `torch.empty` (and the like) created and nothing wrote to since."""

    def __init__(self):
        super().__init__()
        self.unwritten: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # nn.init's functions arrive with the tensor as a keyword (`tensor=`), Tensor methods with it first.
        written = args[0] if args else kwargs.get("tensor")
        if func in EMPTY_FACTORIES and isinstance(result, torch.Tensor):
            self.unwritten.add(_storage_address(result))
        elif isinstance(written, torch.Tensor) and _writes_in_place(func):
            self.unwritten.discard(_storage_address(written))
        return result


def _storage_address(tensor: torch.Tensor) -> int | None:
    """Where a tensor's data lives; None for a tensor subclass without storage of its own (quanto's quantized
    weights wrap other tensors), which torch.empty never made."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _writes_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name == "__setitem__" or name.startswith("__i")


def build_noting_empty(build: Callable[[], nn.Module]) -> tuple[nn.Module, tuple[str, ...]]:
    """`build()`, and the names of its floating parameters that were created empty and never written (an integer
    one, compressed-tensors' zero point, is data a quantization library owns, and no normal draw fits it)."""
    with EmptyTracker() as tracker:
        module = build()
    if not isinstance(module, nn.Module):
        return module, ()
    names = tuple(
        name
        for name, parameter in module.named_parameters()
        if not isinstance(parameter, nn.parameter.UninitializedParameter)  # a lazy module's: refused later
        and parameter.numel()
        and parameter.is_floating_point()
        and _storage_address(parameter) in tracker.unwritten - {None}
    )
    return module, names


def initialise(module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    with torch.no_grad():
        for name in names:
            module.get_parameter(name).normal_(std=INIT_STD)
    return module
