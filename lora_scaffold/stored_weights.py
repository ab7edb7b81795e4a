"""How a module of a scanned model keeps its weights: stored quantized (integer or float8 data, a tensor subclass,
a parameter or a buffer), or a float weight its forward rounds (compressed-tensors' frozen nn.Linear). PEFT's float
layers (`lora.Linear`, ...) train on such a module, but their merge cannot write W + dW back into it: quanto's merge
changes nothing, compressed-tensors' merges under a stale scale, bitsandbytes' raises."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lora_scaffold.capture import recorded_call
from lora_scaffold.errors import USER_CODE_ERRORS, ScaffoldError
from lora_scaffold.introspect import tensor_info
from lora_scaffold.request import ModelCall
from lora_scaffold.rounding import rounding
from lora_scaffold.strategies import peft_builtin


def quantized_tensors(module: nn.Module) -> dict[str, str]:
    """The module's own tensors stored quantized, by name, with their storage (int8, WeightQBytesTensor)."""
    found = {}
    for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
        info = tensor_info(name, tensor)
        if info.quantized:
            found[name] = info.holder.rpartition(".")[2] or info.dtype
    return found


def storage(module: nn.Module, measured_on: Callable[[], tuple[nn.Module, ModelCall] | None]) -> str:
    """What sets the module's storage apart ("" for plain float weights): "weight stored as int8", or, for a module
    of a class PEFT adapts itself that may round its float weight in its forward, "weight rounded by its forward with
    weight_scale", measured on the model built for real and the call it makes (`measured_on()`, None if none)."""
    stored = quantized_tensors(module)
    if stored:
        return "; ".join(f"{name} stored as {kind}" for name, kind in stored.items())
    if not _may_round(module):
        return ""
    try:
        measure = measured_on()
        if measure is None:
            return ""
        real, call = measure
        how = rounding(real.get_submodule(call.module), "weight", lambda seed: recorded_call(call, seed))
    except (*USER_CODE_ERRORS, ScaffoldError):
        return ""
    return f"weight {how}" if how else ""


def _may_round(module: nn.Module) -> bool:
    """A module of a class PEFT adapts itself holding tensors a plain one does not, whose forward is replaced on the
    instance, or of a subclass with a forward of its own: where a forward may read its float weight through a
    rounding. Plain modules are not measured."""
    builtin = next((cls for cls in type(module).__mro__ if peft_builtin(cls, exact=True)), None)
    if builtin is None or not isinstance(getattr(module, "weight", None), nn.Parameter):
        return False
    extra = {*module._parameters, *module._buffers} - {"weight", "bias"}
    return bool(extra) or "forward" in vars(module) or type(module).forward is not builtin.forward
