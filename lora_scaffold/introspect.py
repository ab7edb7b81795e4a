"""Stage 2: build the target once and describe it as plain data (no torch objects survive this stage)."""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from lora_scaffold import init_expression
from lora_scaffold.constructor import CtorParam, choose_ctor_args, ctor_params, is_literal
from lora_scaffold.element_budget import build_small_on_cpu
from lora_scaffold.errors import USER_CODE_ERRORS, TargetError
from lora_scaffold.names import expression_source
from lora_scaffold.resolve import ResolvedTarget
from lora_scaffold.uninitialised import build_noting_empty, initialise


# Attributes PEFT and the generated layer read from a base layer, shown by `inspect` and used to infer inputs.
PEFT_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "output_padding",
    "dilation",
    "groups",
    "padding_mode",
    "num_embeddings",
    "embedding_dim",
    "padding_idx",
    "in1_features",
    "in2_features",
    "input_size",
    "hidden_size",
    "nx",
    "nf",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    computed: bool = False  # computed by a parametrization (weight_norm, ...) from parametrizations.NAME.original*
    # A matrix stored quantized (integer or float8 data, a parameter or a buffer): the base's forward reads it,
    # nothing can write W + dW back into it exactly, and the probe cannot move it by a small float change.
    quantized: bool = False
    # The tensor subclass holding quantized data behind a float dtype (torchao's Int8Tensor), as module.QualName.
    holder: str = ""
    # How the forward rounds this float weight (compressed-tensors' fake quantization), set by analysis: it is then
    # `quantized` too.
    rounded: str = ""


# Storage a quantized base keeps its weight in: integers (int8 values, or int4/ternary values packed into bytes
# or words) and float8. A float of 16 bits or more is a weight like any other.
QUANTIZED_DTYPES = frozenset(
    {"int8", "uint8", "int16", "int32", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}
)
# Above this many parameter elements, size-like defaults are scaled down: the probe and the generated tests build
# the target for real, and a 50 000 x 8 192 embedding would cost 1.6 GB each time.
ELEMENT_BUDGET = 1_000_000
SCALED_SIZE = 16
# Integers that shape a module's structure rather than its size: never scaled, and what sizes must stay divisible by.
STRUCTURAL = ("groups", "num_heads", "kernel_size", "stride", "padding", "dilation", "output_padding", "num_layers")


@dataclass(frozen=True)
class TargetSpec:
    target: ResolvedTarget
    ctor_params: tuple[CtorParam, ...]
    ctor_args: tuple[tuple[str, str], ...]
    guessed_args: tuple[str, ...]
    scaled_args: tuple[tuple[str, str, str], ...]
    parameters: tuple[TensorInfo, ...]
    buffers: tuple[TensorInfo, ...]
    attributes: tuple[tuple[str, str], ...]
    forward_arity: int
    init: str | None = None  # the --init expression the target is built from, instead of ctor_args
    init_imports: tuple[tuple[str, tuple[str, ...]], ...] = ()  # what evaluating it needs imported
    uninitialised: tuple[str, ...] = ()  # parameters its constructor leaves as torch.empty

    def build(self) -> nn.Module:
        """The target, built as the generated tests build it."""
        if self.init:
            module = init_expression.build(self.target, self.init)
        else:
            module = instantiate(self.target, {name: ast.literal_eval(source) for name, source in self.ctor_args})
        return initialise(module, self.uninitialised)

    def attribute_values(self) -> dict[str, object]:
        return {name: ast.literal_eval(source) for name, source in self.attributes}

    def parameter(self, name: str) -> TensorInfo | None:
        return next((p for p in self.parameters if p.name == name), None)


def introspect(target: ResolvedTarget, overrides: dict[str, str], init: str | None = None) -> TargetSpec:
    params = ctor_params(target.cls)
    if init is not None:
        return _from_init(target, params, expression_source(init, "--init"), overrides)
    ctor_args, guessed = choose_ctor_args(target, params, overrides)
    kwargs = {name: ast.literal_eval(source) for name, source in ctor_args}
    module, empty = _built(lambda device: instantiate(target, kwargs, device))
    _refuse_lazy(target, module)
    if _size(module) > ELEMENT_BUDGET:
        scaled = scale_down(target, params, ctor_args, overrides)
        if scaled:  # built again, smaller: what it leaves empty is asked of that build
            ctor_args, changes, module = scaled
            return _spec(target, params, module, ctor_args=ctor_args, guessed_args=guessed, scaled_args=changes)
    return _spec(target, params, module, empty, ctor_args=ctor_args, guessed_args=guessed)


def _from_init(target: ResolvedTarget, params, init: str, overrides: dict[str, str]) -> TargetSpec:
    if overrides:
        raise TargetError("--init builds the target itself: give constructor arguments there, not with --arg")
    imports = init_expression.imports_for(target, init)
    module, empty = _built(lambda device: init_expression.build(target, init, device))
    _refuse_lazy(target, module)
    return _spec(target, params, module, empty, init=init, init_imports=imports)


def _built(build: Callable[[str], nn.Module]) -> tuple[nn.Module, tuple[str, ...] | None]:
    """One build of the target: on the CPU within the budget, noting the parameters it leaves `torch.empty`; else
    on the meta device, where nothing is told of values (None)."""
    empty: tuple[str, ...] | None = None

    def on(device: str) -> nn.Module:
        nonlocal empty
        if device == "meta":
            empty = None
            return build(device)
        module, empty = build_noting_empty(lambda: build(device))
        return module

    return build_small_on_cpu(on, ELEMENT_BUDGET), empty


def _spec(
    target: ResolvedTarget, params, module: nn.Module, empty: tuple[str, ...] | None = None, **how
) -> TargetSpec:
    spec = TargetSpec(
        target=target,
        ctor_params=params,
        parameters=tuple(tensor_info(name, p) for name, p in module.named_parameters()) + computed_weights(module),
        buffers=tuple(tensor_info(name, b) for name, b in module.named_buffers()),
        attributes=_peft_attributes(module),
        forward_arity=forward_arity(target.cls),
        **{"ctor_args": (), "guessed_args": (), "scaled_args": ()} | how,
    )
    if _size(module) > ELEMENT_BUDGET:
        return spec  # too big to build for real: nothing can be told of its values
    return replace(spec, uninitialised=empty if empty is not None else build_noting_empty(spec.build)[1])


def _refuse_lazy(target: ResolvedTarget, module: nn.Module) -> None:
    lazy = [name for name, p in module.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        becomes = getattr(target.cls, "cls_to_become", None)
        instead = f"; target {becomes.__module__}.{becomes.__name__}, what it becomes, instead" if becomes else ""
        raise TargetError(
            f"{target.class_name} has lazy parameters ({', '.join(lazy)}), whose shapes are unknown until its first "
            f"forward{instead}"
        )


def instantiate(target: ResolvedTarget, kwargs: dict[str, object], device: str = "cpu") -> nn.Module:
    """Build the target; on the meta device first when only shapes are needed, so huge defaults cost nothing."""
    torch.manual_seed(0)
    try:
        with torch.device(device):
            return target.cls(**kwargs)
    except USER_CODE_ERRORS as exc:
        if device != "cpu":
            return instantiate(target, kwargs, "cpu")
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise TargetError(f"{target.class_name}({call}) raised {type(exc).__name__}: {exc}") from exc


def scale_down(target: ResolvedTarget, params: tuple[CtorParam, ...], ctor_args, overrides: dict[str, str]):
    """Shrink large size-like integers the user did not give (defaults and guesses), keeping them divisible by
    groups and heads; None when that does not bring the module under the budget."""
    chosen = {name: ast.literal_eval(source) for name, source in ctor_args}
    values = {p.name: _literal(p.default) for p in params if p.default is not None} | chosen
    unit = math.lcm(*(values[n] for n in ("groups", "num_heads") if isinstance(values.get(n), int) and values[n] > 0))
    small = unit * math.ceil(SCALED_SIZE / unit)
    scaled = {
        name: small
        for name, value in values.items()
        if name not in overrides and name not in STRUCTURAL and type(value) is int and value > small * 4
    }
    if not scaled:
        return None
    kwargs = chosen | scaled
    module = instantiate(target, kwargs, device="meta")
    if _size(module) > ELEMENT_BUDGET:
        return None
    order = [p.name for p in params] + [name for name in chosen if name not in {p.name for p in params}]
    new_args = tuple((name, repr(kwargs[name])) for name in order if name in kwargs)
    changes = tuple((name, repr(values[name]), repr(small)) for name in scaled)
    return new_args, changes, module


def _literal(source: str):
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return None


def _size(module: nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def forward_arity(cls: type) -> int:
    """How many positional inputs forward requires (at least one)."""
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return 1
    positional = [
        p
        for p in list(signature.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return max(1, len(positional))


def computed_weights(module: nn.Module) -> tuple[TensorInfo, ...]:
    """The tensors parametrizations compute (`weight` under weight_norm): what a user means by that name."""
    found = []
    for prefix, owner in module.named_modules():
        if parametrize.is_parametrized(owner):
            for name in owner.parametrizations:
                full = f"{prefix}.{name}" if prefix else name
                found.append(replace(tensor_info(full, getattr(owner, name)), requires_grad=True, computed=True))
    return tuple(found)


def _quantized_subclass(tensor: torch.Tensor) -> bool:
    """A tensor subclass holding quantized data behind a float dtype (quanto's WeightQBytesTensor, torchao's
    Int8Tensor): any subclass but a parameter's own kinds (bitsandbytes' Int8Params has an int dtype anyway)."""
    kind = type(tensor)
    return (
        kind not in (torch.Tensor, nn.Parameter, nn.Buffer)
        and not isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))
        and type(tensor.data) is not torch.Tensor
    )


def tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    dtype = str(tensor.dtype).removeprefix("torch.")
    matrix = sum(size > 1 for size in tensor.shape) >= 2
    subclass = _quantized_subclass(tensor)
    # bitsandbytes' 4-bit weight is a column of packed bytes: a matrix only to the parameter class holding it.
    holder = type(tensor) not in (torch.Tensor, nn.Parameter, nn.Buffer)  # Params4bit, Int8Params
    packed = (dtype in QUANTIZED_DTYPES and (matrix or holder) and tensor.numel() > 1) or (
        subclass and tensor.numel() > 1
    )
    holder_class = f"{type(tensor).__module__}.{type(tensor).__qualname__}" if subclass else ""
    return TensorInfo(name, tuple(tensor.shape), dtype, tensor.requires_grad, quantized=packed, holder=holder_class)


def _peft_attributes(module: nn.Module) -> tuple[tuple[str, str], ...]:
    found = []
    for name in PEFT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, list):
            value = tuple(value)
        if value is not None and is_literal(value):
            found.append((name, repr(value)))
    return tuple(found)
