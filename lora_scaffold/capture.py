"""`--from-model`: the model is the truth. It is built for real (small, seeded), fed its input once, and a forward
pre-hook records what one submodule receives (positional and keyword arguments): that call is the probe's input and
the generated tests', which rebuild the model and record the call the same way (`partials/captured_call.jinja`)."""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from functools import lru_cache

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, AnalysisError, NotCalled, TargetError
from lora_scaffold.init_expression import ModuleNamespace
from lora_scaffold.request import ModelCall
from lora_scaffold.uninitialised import build_noting_empty, initialise


MODEL_SEED = 0
# A forward of the model is made for real: a model past this many elements was not built from a small config.
MODEL_ELEMENT_BUDGET = 50_000_000
BATCH, TOKENS = 2, 8


class Captured(BaseException):
    """Ends the model's forward once the submodule's call is recorded (a BaseException passes `except Exception`)."""


def recorded_call(call: ModelCall, seed: int) -> tuple[tuple, dict]:
    """(args, kwargs) the submodule receives when the model's input is drawn with `seed` (a copy: callers may cast
    or move what they get)."""
    return copy.deepcopy(_recorded(call, seed))


@lru_cache(maxsize=16)
def _recorded(call: ModelCall, seed: int) -> tuple[tuple, dict]:
    """One forward of the model per (call, seed) in a process (analysis asks for the same call several times), ended
    by a forward pre-hook on the submodule once it has recorded the call."""
    model = built_model(call.model)
    calls = []

    def record(module: nn.Module, args: tuple, kwargs: dict):
        calls.append(copy.deepcopy(bound_call(module, args, kwargs)))
        raise Captured

    handle = model.get_submodule(call.module).register_forward_pre_hook(record, with_kwargs=True)
    args, kwargs = model_arguments(call.model_input, seed)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Captured:
        pass
    except USER_CODE_ERRORS as exc:
        raise _input_failure(call.model_input, exc) from None
    finally:
        handle.remove()
    if not calls:
        raise _never_called(model, call)
    return calls[0]


def _never_called(model: nn.Module, call: ModelCall) -> NotCalled:
    """The cause, where the model shows it: a parent applying the module's weights itself (MultiheadAttention its
    `out_proj`) is the target then, else another input may reach the module."""
    from lora_scaffold.adapter_checks import read_without_call  # which imports this module

    words = f"the model's forward on {call.model_input} never calls {call.module}"
    parent, _, leaf = call.module.rpartition(".")
    if parent and read_without_call(model, [call.module], call.model_input):
        weights = [name for name, p in model.get_submodule(call.module).named_parameters() if p.dim() >= 2]
        weight = "weight" if "weight" in weights else (weights or ["weight"])[0]
        return NotCalled(
            f"{words}: its parent reads its weights itself, so a layer on it would be dead; target the parent: "
            f"--module {parent} --weight {leaf}.{weight}"
        )
    return NotCalled(f"{words}; pass --model-input EXPR with an input that reaches it")


def check_runs(model: nn.Module, model_input: str) -> None:
    """Raises, naming the input, where the plain model's forward fails on it: what fails later, on the adapted model,
    is then the adapters' doing, not the input's."""
    args, kwargs = model_arguments(model_input, MODEL_SEED)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except USER_CODE_ERRORS as exc:
        raise _input_failure(model_input, exc) from None


def _input_failure(model_input: str, exc: BaseException) -> AnalysisError:
    return AnalysisError(
        f"the model's forward fails on its input {model_input}: {type(exc).__name__}: {exc}; pass --model-input EXPR "
        "with what the model is fed"
    )


def evaluate_model(model: str):
    """A fresh build of the model an expression builds, on the CPU, seeded, with the parameters its init leaves
    `torch.empty` drawn as the generated tests draw them (`left_empty`)."""
    built, empty = _build(model)
    return initialise(built, empty)


def left_empty(model: str) -> tuple[str, ...]:
    """The model's parameters its init leaves as uninitialised memory (Qwen3-Omni's talker's experts: garbage that
    makes the model's output NaN), which the tool and the tests fill normal(0, INIT_STD) right after the build."""
    return _shared_build(model)[1]


def built_model(model: str) -> nn.Module:
    """One build of the model per process (several captures and the probe's seeds share it), in eval mode and
    without a key-value cache, whose state would make a repeated call differ."""
    return _shared_build(model)[0]


@lru_cache(maxsize=4)
def _shared_build(model: str) -> tuple[nn.Module, tuple[str, ...]]:
    built, empty = _build(model)
    if not isinstance(built, nn.Module):
        raise TargetError(f"{model!r} gives a {type(built).__name__}, not an nn.Module")
    initialise(built, empty)
    size = sum(t.numel() for t in (*built.parameters(), *built.buffers()))
    if size > MODEL_ELEMENT_BUDGET:
        raise TargetError(
            f"{model!r} has {size:,} weight elements; --from-model runs it for real: build it from a small config"
        )
    if any(t.is_meta for t in built.parameters()):
        raise TargetError(f"{model!r} gives a model on the meta device; --from-model runs it: build it on the CPU")
    config = getattr(built, "config", None)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return built.eval(), empty


def _build(model: str) -> tuple[object, tuple[str, ...]]:
    torch.manual_seed(MODEL_SEED)
    try:
        with torch.device("cpu"):
            built, empty = build_noting_empty(
                lambda: eval(model, ModuleNamespace(torch=torch, nn=nn))  # noqa: S307 - the user's own expression
            )
    except USER_CODE_ERRORS as exc:
        raise TargetError(f"building the model {model!r} failed: {type(exc).__name__}: {exc}") from None
    return built, empty


def model_arguments(model_input: str, seed: int) -> tuple[tuple, dict]:
    torch.manual_seed(seed)
    try:
        value = eval(model_input, {"torch": torch, "math": math})  # noqa: S307 - the user's own expression
    except USER_CODE_ERRORS as exc:
        raise AnalysisError(f"--model-input {model_input!r} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(value, dict):
        return (), value
    return (value if isinstance(value, tuple) else (value,)), {}


def bound_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with every argument that can be positional made positional (the tests take the batch from the first),
    the rest kept as keywords."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    return bound.args, bound.kwargs


def default_model_input(model: nn.Module) -> str:
    """An input for a transformers model from its config (`model_input_choices`): the first choice its forward takes,
    tried only where there is more than one, once per model."""
    choices = model_input_choices(model)
    if len(choices) == 1:
        return choices[0]
    if model not in _CHOSEN:
        _CHOSEN[model] = next((choice for choice in choices if _runs(model, choice)), choices[0])
    return _CHOSEN[model]


_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_input_choices(model: nn.Module) -> tuple[str, ...]:
    """Inputs for a transformers model from its config: token ids, pixel values (as patches with their grid for a
    vision tower that takes them so), video frames, audio values or features, decoder ids for an encoder-decoder;
    then embeddings for a decoder that takes them (Qwen3-Omni's talker is fed embeddings by its parent and fails on
    ids), and audio laid out the other way (AST's spectrogram, frames first). The main input is the config's, or the
    forward's first parameter where the forward does not take that (vision towers keep PreTrainedModel's
    `input_ids`). Raises for a model that gives no clue; the user then passes --model-input."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise AnalysisError(
            f"{type(model).__name__} has no transformers config to make its input from: pass --model-input EXPR, what "
            "the model is fed ('torch.randn(2, 16)', or a dict of keyword inputs)"
        )
    takes = inspect.signature(model.forward).parameters
    main = main if main in takes else next(iter(_named_parameters(takes)), main)
    patched = _patch_inputs(getattr(config, "vision_config", None) or config, main, takes)
    if patched:
        return tuple(_listed(entries) for entries in patched)
    extra = {}
    if getattr(config, "is_encoder_decoder", False):
        extra["decoder_input_ids"] = f"torch.randint(0, {_vocab_size(config)}, ({BATCH}, 4))"
    choices = []
    for value, frames in _main_inputs(config, main, type(model).__name__):
        # A mask the forward needs beside its features (AudioFlamingo3's encoder sums it): every frame is real.
        choices.append(_listed({main: value} | _companions(main, frames, takes) | extra))
    hidden = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", None)
    if main == "input_ids" and "inputs_embeds" in takes and isinstance(hidden, int):
        choices.append(_listed({"inputs_embeds": f"torch.randn({BATCH}, {TOKENS}, {hidden})"} | extra))
    return tuple(choices)


def _companions(main: str, frames: int, takes) -> dict[str, str]:
    """What the forward needs beside its main input: a mask of it (AudioFlamingo3's encoder sums it: every frame is
    real), a time series' padding (none) and its frequency class (TimesFM's `freq`, the first)."""
    wanted = {
        f"{main}_mask": f"torch.ones({BATCH}, {frames}, dtype=torch.long)",
        f"{main}_padding": f"torch.zeros({BATCH}, {frames})",
    }
    if main == "past_values":
        wanted["freq"] = f"torch.zeros({BATCH}, 1, dtype=torch.long)"
    return {name: value for name, value in wanted.items() if name in takes}


def _named_parameters(parameters) -> list[str]:
    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    return [name for name, parameter in parameters.items() if parameter.kind in kinds]


# The side of the grid of patches a vision tower is fed, in merged patches (Qwen-VL's towers merge 2 x 2 patches).
GRID = 2
MERGES = ("spatial_merge_size", "merge_kernel_size", "merge_size", "pooling_kernel_size")
TEMPORAL = ("temporal_patch_size", "patch_temporal")  # the frames one patch spans
# What a tower fed patches takes beside them, telling where each patch lies
PATCH_LAYOUTS = frozenset(["grid_thw", "spatial_shapes", "pixel_position_ids", "target_sizes"])


def _patch_inputs(vision, main: str, takes) -> list[dict[str, str]]:
    """Inputs of a vision tower fed flattened patches beside their grid: Qwen-VL's and its kin's `grid_thw` (one
    image of (1, h, w) patches, its patches laid out as each tower reads them: the layouts are tried in turn),
    SigLIP2's `spatial_shapes` with its attention mask, Gemma 4's `pixel_position_ids`, MiniCPM's `target_sizes` (of
    one image: its tower takes one at a time). [] for any other model."""
    patch = getattr(vision, "patch_size", None)
    if not isinstance(patch, int) or not PATCH_LAYOUTS & set(takes) or main == "input_ids":
        return []  # a whole multimodal model, fed token ids first, is not a tower
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3
    # What the tower merges or pools patches by: the grid's side is a multiple of it.
    merge = _first_set(vision, MERGES)
    merge = merge[0] if isinstance(merge, (tuple, list)) else merge
    side = GRID * merge
    count = side * side
    if "grid_thw" in takes:
        temporal = _first_set(vision, TEMPORAL)
        grid = {"grid_thw": f"torch.tensor([[1, {side}, {side}]])"}
        if "merge_sizes" in takes:  # VideoLLaMA3's tower is told its merge size per image
            grid["merge_sizes"] = f"torch.tensor([{merge}])"
        layouts = [(count, channels * temporal * patch * patch), (count, channels, temporal, patch, patch)]
        layouts += [(count, channels, patch, patch), (count, channels * patch * patch)]
        return [{main: f"torch.randn{shape}"} | grid for shape in dict.fromkeys(layouts)]
    if "target_sizes" in takes:
        pixels = f"torch.randn(1, {channels}, {side * patch}, {side * patch})"
        return [{main: pixels, "target_sizes": f"torch.tensor([[{side}, {side}]])"}]
    flat = f"torch.randn({BATCH}, {count}, {channels * patch * patch})"
    if "spatial_shapes" in takes:
        mask = f"torch.ones({BATCH}, {count}, dtype=torch.long)"
        shapes = f"torch.tensor([[{side}, {side}]] * {BATCH})"
        return [{main: flat, "pixel_attention_mask": mask, "spatial_shapes": shapes}]
    positions = f"torch.stack(torch.meshgrid(torch.arange({side}), torch.arange({side}), indexing='xy'), -1)"
    return [{main: flat, "pixel_position_ids": f"{positions}.reshape(1, {count}, 2).expand({BATCH}, -1, -1)"}]


def _first_set(config, names: tuple[str, ...]):
    """The first of the config's attributes `names` that is set, else 1."""
    return next((getattr(config, name) for name in names if getattr(config, name, None)), 1)


def _listed(entries: dict[str, str]) -> str:
    return "{" + ", ".join(f"{key!r}: {value}" for key, value in entries.items()) + "}"


def _runs(model: nn.Module, model_input: str) -> bool:
    args, kwargs = model_arguments(model_input, MODEL_SEED)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except USER_CODE_ERRORS:
        return False
    return True


def _main_inputs(config, main: str, model_name: str) -> list[tuple[str, int]]:
    """(expression, frames) of each layout the main input may take, most common first (frames: its time steps)."""
    if main == "input_ids":
        return [(f"torch.randint(0, {_vocab_size(config)}, ({BATCH}, {TOKENS}))", TOKENS)]
    if main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        channels = getattr(vision, "num_channels", 3)
        size = getattr(vision, "image_size", 32)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        image = [(f"torch.randn({BATCH}, {channels}, {height}, {width})", 1)]
        frames = getattr(vision, "num_frames", None)
        if isinstance(frames, int):  # a video: frames first (VideoMAE, ViViT, TimeSformer), else channels first
            return [
                (f"torch.randn({BATCH}, {frames}, {channels}, {height}, {width})", frames),
                (f"torch.randn({BATCH}, {channels}, {frames}, {height}, {width})", frames),
                *image,  # a config may count frames for a model fed images
            ]
        return image
    bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None)
    if main == "input_values":
        strides = getattr(config, "conv_stride", None) or (1,)
        kernels = getattr(config, "conv_kernel", None) or (1,)
        samples = math.prod(strides) * TOKENS + sum(kernels)
        # A waveform sized by the feature encoder's convolutions, else a second of 16 kHz audio (Moonshine's
        # kernel of 127 samples is in no config field).
        layouts = [(f"torch.randn({BATCH}, {samples})", samples), (f"torch.randn({BATCH}, 16000)", 16000)]
        frames = getattr(config, "max_length", None)
        if isinstance(bins, int) and isinstance(frames, int):  # a spectrogram, frames first (AST)
            layouts.append((f"torch.randn({BATCH}, {frames}, {bins})", frames))
        return layouts
    if main == "input_features":
        bins = bins if isinstance(bins, int) else 80
        frames = 2 * getattr(config, "max_source_positions", TOKENS * 4)
        return [
            (f"torch.randn({BATCH}, {bins}, {frames})", frames),
            (f"torch.randn({BATCH}, {frames}, {bins})", frames),
        ]
    context = getattr(config, "context_length", None)
    if main == "past_values" and isinstance(context, int):
        # A time series: steps, then channels (PatchTST); or one series a row (TimesFM)
        channels = getattr(config, "num_input_channels", None) or getattr(config, "input_size", None) or 1
        return [
            (f"torch.randn({BATCH}, {context}, {channels})", context),
            (f"torch.randn({BATCH}, {context})", context),
        ]
    raise AnalysisError(
        f"{model_name} takes {main!r}, for which lora-scaffold has no default: pass --model-input EXPR"
    )


def _vocab_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    return min(int(vocab), 1000) if isinstance(vocab, int) and vocab > 0 else 16
