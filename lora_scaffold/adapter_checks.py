"""The checks `audit` makes of each adapter in the model: is it called (reached), does a change of it move the
model's output (live), do its LoRA parameters get gradients, and does merging it leave the output as it was."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lora_scaffold.capture import model_arguments
from lora_scaffold.errors import USER_CODE_ERRORS, AnalysisError
from lora_scaffold.sample_input import flatten_output


FACTOR_STD = 0.05


def randomise(layers) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            for name, parameter in layer.named_parameters():
                if "lora_" in name:
                    values = torch.randn(parameter.shape, generator=generator) * FACTOR_STD
                    parameter.copy_(values.to(parameter.dtype))


def runner(model: nn.Module, model_input: str):
    def run() -> torch.Tensor:
        args, kwargs = model_arguments(model_input, 0)
        try:
            with torch.no_grad():
                output = model(*args, **kwargs)
        except USER_CODE_ERRORS as exc:
            raise _adapted_failure("forward", exc) from None
        return _floating(output)

    return run


def _adapted_failure(step: str, exc: BaseException) -> AnalysisError:
    # `audit` ran the plain model on the same input first (capture.check_runs): the LoRA layers are the difference.
    layer, name = getattr(exc, "obj", None), getattr(exc, "name", None)
    if isinstance(exc, AttributeError) and hasattr(layer, "get_base_layer") and name:
        base = layer.get_base_layer()
        if hasattr(base, name):  # PEFT's layers pass on `weight` and `bias` only (Qwen2-Audio reads `conv1.stride`)
            return AnalysisError(
                f"the adapted model's {step} failed: the model reads `{name}` of a {type(base).__name__}, which "
                f"{_whose(layer)} lora.{type(layer).__name__} wrapping it does not pass on (the plain model runs on "
                "this input): leave such modules out of target_modules"
            )
    return AnalysisError(
        f"the adapted model's {step} failed: {type(exc).__name__}: {exc} (the plain model runs on this input: a LoRA "
        "layer lacks something the model uses of the module it wraps)"
    )


def _whose(layer) -> str:
    return "PEFT's" if type(layer).__module__.startswith("peft.") else "the generated"


def _floating(output) -> torch.Tensor:
    floats = [t for t in flatten_output(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        raise AnalysisError("the model's output holds no floating tensor to compare")
    return torch.cat([t.detach().flatten().float() for t in floats])


def _own_factors(layer) -> list:
    """The layer's own LoRA parameters, not those of LoRA layers nested in its base module (a mixer's projections)."""
    return [(n, p) for n, p in layer.named_parameters() if "lora_" in n and not n.startswith("base_layer.")]


def reached(model: nn.Module, adapted: dict, model_input: str) -> set[str]:
    """The adapted modules the model's forward reaches, in eval or in training mode: it calls them, or reads their base
    weights itself (a fused path: Mamba's CPU `mamba_inner_fn` reads `dt_proj.weight`, which makes the adapter dead,
    not unreached). An expert no token is routed to is neither called nor read."""
    weights = {name: list(layer.get_base_layer().parameters()) for name, layer in adapted.items()}
    called, called_empty, read = _calls_and_reads(model, adapted, weights, model_input, modes=(False, True))
    # A module called only on empty inputs (Higgs Audio's audio_mlp on the no audio tokens of a text input) reads its
    # weights there too, and proves nothing either.
    return called | (read - called_empty)


def read_without_call(model: nn.Module, names: list[str], model_input: str) -> set[str]:
    """Of the modules `names`, those whose own weights the model's forward (eval mode) reads while it never calls
    them: a parent using a child's weight itself (LongCat's router and its `classifier`), where a LoRA layer on the
    child is dead. A weight a called module holds too (a tied table: NLLB's `shared`) does not count."""
    holders: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), set()).add(name)
    own = {name: list(model.get_submodule(name).parameters(recurse=False)) for name in names}
    called, called_empty, read = _calls_and_reads(model, dict(model.named_modules()), own, model_input, modes=(False,))
    called |= called_empty
    return {name for name in read - called if not any(holders[id(p)] & called for p in own[name])}


def _calls_and_reads(
    model: nn.Module, watched: dict[str, nn.Module], weights: dict[str, list], model_input: str, modes: tuple
) -> tuple[set[str], set[str], set[str]]:
    """The names in `watched` whose modules the model's forward calls on inputs holding data, those it calls only on
    empty ones, and those in `weights` whose tensors any torch function is given, over a forward in each mode
    (training or not); a forward that fails counts what it reached before."""
    called: set[str] = set()
    called_empty: set[str] = set()
    read: set[str] = set()

    def note_call(_module, args, kwargs, name):
        tensors = [value for value in _leaves((args, kwargs)) if isinstance(value, torch.Tensor)]
        (called if not tensors or any(t.numel() for t in tensors) else called_empty).add(name)

    hooks = [
        module.register_forward_pre_hook(functools.partial(note_call, name=name), with_kwargs=True)
        for name, module in watched.items()
    ]
    owners: dict[int, set[str]] = {}
    for name, tensors in weights.items():
        for tensor in tensors:
            owners.setdefault(id(tensor), set()).add(name)
    try:
        for training in modes:
            model.train(training)
            with contextlib.suppress(*USER_CODE_ERRORS), torch.no_grad(), _WeightReads(owners, read):
                args, kwargs = model_arguments(model_input, 0)
                model(*args, **kwargs)
    finally:
        model.eval()
        for hook in hooks:
            hook.remove()
    return called, called_empty - called, read


class _WeightReads(TorchFunctionMode):
    """Adds to `found` the names owning a tensor any torch function is given."""

    def __init__(self, owners: dict[int, set[str]], found: set[str]):
        super().__init__()
        self.owners, self.found = owners, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in _leaves((args, kwargs or {})):
            if id(value) in self.owners:
                self.found |= self.owners[id(value)]
        return func(*args, **(kwargs or {}))


def _leaves(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


# How much a check scales an adapter's B by, in turn: dead means the output never moves, and an adapter whose effect
# is real but below the output's float resolution at init (Qwen3.5's `in_proj_a` behind a decay of exp(-17)) moves it
# at 1e3. Not further: at 1e6 the change reaches a model's epsilons (DeepSeek-V4's hash router weighs its experts
# s / (2s + 1e-20), 1/2 whatever the scores until they are ~1e-20), a move no training could make.
LIVE_SCALES = (3.0, 1e3)


def live(layer, run, reference: torch.Tensor) -> bool:
    """Whether scaling the adapter's B moves the model's output (on the no-grad, eval path the model runs). Past the
    first scale, only a finite move counts: an overflow makes outputs NaN that do not depend on the adapter too."""
    factors = [p for n, p in _own_factors(layer) if "lora_B" in n or "lora_embedding_B" in n]
    finite = reference.isfinite()
    for scale in LIVE_SCALES:
        with torch.no_grad():
            saved = [parameter.clone() for parameter in factors]
            for parameter in factors:
                parameter.mul_(scale)
            try:
                output = run()
            except AnalysisError:
                if scale == LIVE_SCALES[0]:
                    raise
                output = None  # a change this large breaks the forward: it says nothing either way
            finally:
                for parameter, values in zip(factors, saved):
                    parameter.copy_(values)
        if output is None:
            continue
        if output.shape != reference.shape:
            return True
        if scale != LIVE_SCALES[0] and not output[finite].isfinite().all():
            continue
        if not _same(output, reference):
            return True
    return False


def _same(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal entry for entry, NaN where the reference is NaN (a masked row) counting as unchanged."""
    return bool(((output == reference) | (output.isnan() & reference.isnan())).all())


def gradients(model: nn.Module, adapted: dict, model_input: str) -> dict[str, bool]:
    """Which adapters get a non-zero gradient of every LoRA parameter from the model's output: in eval mode (no
    dropout, no training-only masking), or else in training mode (an eval-only fused path keeps autograd out;
    Mamba's mixer takes its inference path)."""
    found = _gradients_in(model, adapted, model_input, training=False)
    if not all(found.values()):
        try:
            training = _gradients_in(model, adapted, model_input, training=True)
        except AnalysisError:  # a training-only step that fails on this input (wav2vec2's masking of short audio)
            training = {}
        found = {name: got or training.get(name, False) for name, got in found.items()}
    return found


def _gradients_in(model: nn.Module, adapted: dict, model_input: str, training: bool) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    args, kwargs = model_arguments(model_input, 0)
    model.train(training)
    step = "forward"
    try:
        output = _floating_with_grad(model(*args, **kwargs))
        if not output.requires_grad:  # a fused path that never reads an adapter: none of them gets a gradient
            return dict.fromkeys(adapted, False)
        step = "backward"
        output.pow(2).sum().backward()
    except USER_CODE_ERRORS as exc:
        raise _adapted_failure(f"{step} in {'training' if training else 'eval'} mode", exc) from None
    finally:
        model.eval()
    found = {
        name: all(p.grad is not None and bool(p.grad.abs().sum() > 0) for _, p in _own_factors(layer))
        for name, layer in adapted.items()
    }
    model.zero_grad(set_to_none=True)
    return found


def _floating_with_grad(output) -> torch.Tensor:
    floats = [t for t in flatten_output(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat([t.flatten().float() for t in floats])


def merge_error(layer, run, reference: torch.Tensor) -> tuple[float, str]:
    """The relative change of the model's output once the layer alone is merged (inf where merging fails), and the
    layer's words where it refuses with NotImplementedError and leaves the output as it was ("" otherwise)."""
    try:
        layer.merge()
        merged = run()
    except NotImplementedError as exc:
        untouched = not layer.merged and torch.equal(run(), reference)
        return math.inf, (str(exc) or "NotImplementedError") if untouched else ""
    except USER_CODE_ERRORS:
        return math.inf, ""
    finally:
        if layer.merged:
            layer.unmerge()
    scale = max(float(reference.abs().max()), 1e-12)
    return float((merged - reference).abs().max()) / scale, ""
