"""Build a target on the CPU while it stays small, else on the meta device.

The meta device makes huge defaults free, but torch's meta tensor factories import torch._dynamo (about a second,
most of `new`'s start-up beyond `import torch`). Most targets are small, and the probe builds them on the CPU anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.nn.parameter import UninitializedTensorMixin
from torch.overrides import TorchFunctionMode


T = TypeVar("T")
SIZED_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})


class OverBudget(BaseException):
    """A BaseException, so that the `except Exception` of the target's own code and of our error reports let it by."""


class ElementBudget(TorchFunctionMode):
    """Stops the build (OverBudget) before a factory would take the elements past `budget`, or an op would touch a
    tensor larger than it (an in-place init of an uninitialised `torch.Tensor(n, m)`, which costs nothing until
    touched)."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget = self.left = budget

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SIZED_FACTORIES:
            self.left -= math.prod(_size(args, kwargs))
            if self.left < 0:
                raise OverBudget
        elif any(_numel(arg) > self.budget for arg in (*args, *kwargs.values())):
            raise OverBudget
        return func(*args, **kwargs)


def _numel(value: object) -> int:
    # A lazy module's uninitialised parameters have no size yet (and raise when asked).
    if not isinstance(value, torch.Tensor) or isinstance(value, UninitializedTensorMixin):
        return 0
    return value.numel()


def _size(args: tuple, kwargs: dict) -> tuple[int, ...]:
    if "size" in kwargs:
        return tuple(kwargs["size"])
    if args and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(arg for arg in args if isinstance(arg, int) and not isinstance(arg, bool))


def build_small_on_cpu(build: Callable[[str], T], budget: int) -> T:
    """`build(device)` on the CPU within `budget` elements, or `build("meta")` once it is exceeded."""
    try:
        with ElementBudget(budget):
            return build("cpu")
    except OverBudget:
        return build("meta")
