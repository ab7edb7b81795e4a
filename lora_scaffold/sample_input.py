"""Find an input the target accepts: the probe and the generated tests both run it.

Inputs are kept as Python expressions (such as `torch.randn(2, 4, 9, 9)`), so the exact input the probe used is
what the generated tests evaluate.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, AnalysisError


SEED = 0


def evaluate_input(expression: str, seed: int = SEED) -> tuple:
    """The positional inputs an expression stands for: a tuple stands for several inputs."""
    torch.manual_seed(seed)
    try:
        value = eval(expression, {"torch": torch, "math": math})  # noqa: S307 - the user's own expression
    except USER_CODE_ERRORS as exc:
        raise AnalysisError(f"--example-input {expression!r} failed: {type(exc).__name__}: {exc}") from None
    return value if isinstance(value, tuple) else (value,)


def candidate_inputs(
    weight_shape: tuple[int, ...], arity: int, attributes: dict, storage_shaped: bool = False
) -> list[str]:
    """Plausible layouts, most likely first, for a module whose chosen weight has this shape. A weight stored
    quantized is shaped by its storage (4-bit values packed in a column of bytes): its size attributes go first."""
    if len(weight_shape) >= 3 and arity == 2:
        pairs = [f"(torch.randn(2, {weight_shape[1]}), torch.randn(2, {weight_shape[2]}))"]
    else:
        pairs = []
    singles = _single_inputs(weight_shape, attributes, storage_shaped)
    repeated = ["(" + ", ".join([single] * arity) + ")" for single in singles] if arity > 1 else singles
    return list(dict.fromkeys(pairs + repeated))


# Attributes that name the size of a module's input, for weights whose shape does not show it (LSTM's weight_hh).
INPUT_SIZE_ATTRIBUTES = ("in_features", "input_size", "in_channels", "embed_dim")


def _single_inputs(shape: tuple[int, ...], attributes: dict, named_first: bool = False) -> list[str]:
    named = [attributes[name] for name in INPUT_SIZE_ATTRIBUTES if isinstance(attributes.get(name), int)]
    dims = list(dict.fromkeys([*named, *shape[:2]] if named_first else [*shape[:2], *named]))
    floats = [f"torch.randn(2, {d})" for d in dims] + [f"torch.randn(2, 3, {d})" for d in dims]
    if len(shape) >= 3:
        floats = _spatial_inputs(shape, attributes) + floats
    lookups = [f"torch.randint(0, {d}, (2, 3))" for d in dims]
    return floats + lookups


def _spatial_inputs(shape: tuple[int, ...], attributes: dict) -> list[str]:
    spatial = len(shape) - 2
    groups = attributes.get("groups", 1) if isinstance(attributes.get("groups", 1), int) else 1
    channels = dict.fromkeys(c for c in (attributes.get("in_channels"), shape[1] * groups, shape[0]) if c)
    dilation = attributes.get("dilation", 1)
    dilation = max(dilation) if isinstance(dilation, tuple) else dilation if isinstance(dilation, int) else 1
    side = max(6, max(shape[2:]) * dilation + 3)
    return [f"torch.randn(2, {c}, {', '.join([str(side)] * spatial)})" for c in channels]


def find_sample_input(module: nn.Module, candidates: list[str], given: bool = False, responds=None) -> str:
    """The first candidate the module runs on without error, preferring one on which `responds(inputs)` (the
    output depends on the weight: a relu may zero it on one input and not on a larger one); `given`: the one the
    user gave, which must run."""
    errors, runs = [], []
    module.eval()
    for expression in candidates:
        inputs = evaluate_input(expression)
        if given:
            run_call(module, inputs, {}, f"--example-input {expression}")
            return expression
        try:
            with torch.no_grad():
                output = module(*inputs)
        except USER_CODE_ERRORS as exc:
            errors.append(f"{expression}: {type(exc).__name__}")
            continue
        problem = _output_problem(output)
        if not problem and (responds is None or responds(inputs)):
            return expression
        if not problem:
            runs.append(expression)
        else:
            errors.append(f"{expression}: {problem}")
    if runs:
        return runs[0]
    tried = "; ".join(itertools.islice(errors, 4))
    raise AnalysisError(
        f"could not infer an input {type(module).__name__} accepts (tried {tried}); pass --example-input EXPR, "
        "e.g. --example-input 'torch.randn(2, 4, 9, 9)', or take the class from a model that feeds it: --from-model "
        "MODEL --module NAME"
    )


def run_call(module: nn.Module, args: tuple, kwargs: dict, what: str) -> None:
    """Runs the module on an input that is not a guess; its failure is the input's, said as such."""
    module.eval()
    try:
        with torch.no_grad():
            output = module(*args, **kwargs)
    except USER_CODE_ERRORS as exc:
        raise AnalysisError(f"{type(module).__name__} fails on {what}: {type(exc).__name__}: {exc}") from None
    problem = _output_problem(output)
    if problem:
        raise AnalysisError(f"{type(module).__name__} gives {problem} on {what}; LoRA needs a batched tensor output")


def _output_problem(output) -> str:
    first = next((t for t in flatten_output(output) if isinstance(t, torch.Tensor)), None)
    if first is None:
        return "no tensor output"
    return "" if first.dim() > 0 else "a 0-d output, no batch dimension"


def map_tensors(function, value):
    """`function` applied to every tensor of a nested input (tuples and lists of tensors, as LSTMCell takes)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(function, item) for item in value)
    if isinstance(value, dict):
        return {key: map_tensors(function, item) for key, item in value.items()}
    return value


def flatten_output(output) -> list:
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flatten_output(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in flatten_output(item)]
    return [output]
