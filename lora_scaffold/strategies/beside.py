"""`beside`: a base that keeps its weight quantized (int8 values and a scale, float8, packed integers). LoRA is added
beside the base's own forward, `base(x) + B(A(dropout(x))) * s`, and the base is never touched.

The usual probe moves the weight a little and watches the output; a quantized weight cannot move a little. The
adapter's own output is exact whatever the base computes; what makes it a low-rank change of the base's weight is
the base being a linear map of its input (plus a bias). The probe measures that map in float64 (basis inputs give
its matrix; in float32 where the base does not run in float64, saying why) and checks it on random inputs at several
scales, and says how far from linear the base is when it quantizes its input too, and whether the gradient it
passes back to its input is its map's. Merging writes W + dW back into the quantized storage, which keeps little
of a small dW: through the library's own quantization where `round_trips.py` knows the class (a new base, the old
one kept for unmerge), by a cast for a plain float8 weight, and only where that loses at most `merge_tolerance` of
dW; `new` prints how much of a typical dW it keeps. Otherwise the layer refuses to merge, saying so. The float
export (`unload_dequantized`) is exact wherever the base is linear.
"""

from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass, replace

import torch

from lora_scaffold.errors import USER_CODE_ERRORS
from lora_scaffold.probe import NOT_ONE_TENSOR, RELATIVE_TOLERANCE
from lora_scaffold.round_trips import RoundTrip, round_trip_for
from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


SEEDS = (0, 1, 2)
# The adapter's own output is exact whatever the base does; the base being a linear map is what makes it a
# low-rank change of that map. Bases computing in float32 whatever they are given (bitsandbytes) are linear to its
# rounding; bases that quantize their input too (BitNet's absmax per token, 8 bits) only to about 1e-2. A relu
# after the map is off by far more.
NEARLY_LINEAR = 5e-2
# Below this the gradient a base passes to its input is not its map's (BitNet's straight-through estimate).
GRADIENT_COSINE = 0.99
# A typical trained dW, relative to the weight's spread: what the merge figure at generation is measured on.
TYPICAL_DELTA = 1e-2
SCALES = (1.0, -0.5, 3.0)
# The float export's outputs against the unmerged layer's: within this many times the base's measured distance from
# linear, and never tighter than float32 rounding of a basis-measured matrix allows.
EXPORT_MARGIN = 10
EXPORT_FLOOR = 1e-5
FEATURE_NAMES = (("in_features", "in_dim", "input_size"), ("out_features", "out_dim", "output_size"))


class Beside(Strategy):
    name = family = "beside"
    help = (
        "a weight stored quantized (int8, float8, packed) in a base linear in its input: adds "
        "lora_B(lora_A(dropout(x))) * scaling beside the base's forward; merging requantizes within a tolerance"
    )
    summary = (
        "The adapter adds `lora_B(lora_A(dropout(x))) * scaling` beside the base's forward, which it never changes."
    )
    partial = "partials/beside.jinja"
    layer_partial = "partials/beside_layer.jinja"
    needs_probe = False
    adapts_quantized = True
    merges = False
    no_dora = "DoRA rescales the weight, which this base keeps quantized"

    def fits(self, evidence: Evidence) -> bool:
        return evidence.weight.quantized

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        measured = linear_response(evidence)
        if isinstance(measured, str):
            return (Verdict(self, False, NOT_ONE_TENSOR, measured),)
        if feature_attributes(evidence.module, measured.in_features, measured.out_features) is None:
            note = (
                f"no int attribute of {type(evidence.module).__name__} equals its input size {measured.in_features} "
                f"and its output size {measured.out_features}, which the layer must read at any size"
            )
            return (Verdict(self, False, measured.error, note),)
        matched = measured.error <= NEARLY_LINEAR
        float32 = f"measured in float32: it does not run in float64 ({measured.why_not_float64})"
        notes = (
            "" if matched else "the output is not linear in the input",
            float32 if measured.why_not_float64 else "",
            measured.gradient_note() if matched else "",
        )
        return (Verdict(self, matched, measured.error, "; ".join(filter(None, notes))),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        nearly = verdict.relative_error > RELATIVE_TOLERANCE[torch.float32]
        how = "nearly a linear map of the input" if nearly else "a linear map of the input"
        figure = (
            f"off by {verdict.relative_error:.0e}, as where the input is quantized or the product taken in lower precision"
            if nearly
            else verdict.error_text
        )
        details = "; ".join(filter(None, (figure, verdict.note)))  # the note: measured in float32, and why
        return (
            f"{evidence.weight.name} is stored as {_storage(evidence)} and the output is {how} ({details}): LoRA goes "
            f"beside the base, whose weight stays as it is; {merge_outlook(evidence)}"
        )

    def template_answers(self, evidence: Evidence) -> dict:
        measured = linear_response(evidence)
        in_name, out_name = feature_attributes(evidence.module, measured.in_features, measured.out_features)
        return {
            "in_features_attribute": json.dumps(in_name),
            "out_features_attribute": json.dumps(out_name),
            # The float export is the base's linear part: off by what the base is from linear, and float32 rounding.
            "export_tolerance": json.dumps(float(f"{max(EXPORT_MARGIN * measured.error, EXPORT_FLOOR):.0e}")),
            # The library's own requantization merge goes through ("" where W + dW is cast back, or refused).
            "round_trip": "" if merges_by_cast(evidence) else _round_trip_name(evidence),
        }

    def lacks_quantization_backend(self, evidence: Evidence) -> bool:
        return not peft_has_backend(evidence.module)

    def tolerant_merge(self, evidence: Evidence) -> bool:
        return merges_by_cast(evidence) or round_trip_for(evidence.module) is not None

    def settles(self, evidence: Evidence) -> str:
        return settling(evidence)

    def eval_only(self, evidence: Evidence) -> str:
        """bitsandbytes' 8-bit layer takes another kernel in training mode, which gives other outputs."""
        args, kwargs = evidence.call(0)
        module, state = evidence.module, {n: t.clone() for n, t in evidence.module.state_dict().items()}
        try:
            with torch.no_grad():
                outputs = [module.train(training)(*args, **kwargs) for training in (True, False)]
        except USER_CODE_ERRORS:
            return ""  # the tests' own training-mode runs say what fails
        finally:
            module.eval()
        if any(not same_tensor(state[name], t) for name, t in module.state_dict().items()):
            return "its forward changes the module's state in training mode"
        if not torch.equal(*outputs):
            return "its forward in training mode is not its forward in eval mode"
        return ""

    def battery_blocker(self, evidence: Evidence) -> str:
        return (
            f"PEFT's battery expects every merged output to equal the unmerged one, which a weight stored as "
            f"{_storage(evidence)} cannot hold"
        )


def settling(evidence: Evidence) -> str:
    """What the base's first forward in eval mode (and reading its state after) changes in its state, on a fresh
    build ("" when nothing): bitsandbytes' 4-bit layer re-packs its weight for a CPU kernel and requantizes its
    scales when its state is read. Settles the module analysed as the tests settle theirs; once per built module."""
    if evidence.module not in _SETTLED:
        _SETTLED[evidence.module] = _changed_by_first_forward(evidence.build(), evidence) if evidence.build else ""
        _changed_by_first_forward(evidence.module, evidence)
    return _SETTLED[evidence.module]


def _changed_by_first_forward(module, evidence: Evidence) -> str:
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    args, kwargs = evidence.call(0)
    training = module.training
    try:
        with torch.no_grad():
            module.eval()(*args, **kwargs)
    except USER_CODE_ERRORS:
        return ""  # analysis and the tests say what fails
    finally:
        module.train(training)
    after = module.state_dict()
    changed = sorted(set(before) ^ set(after)) + [
        name for name in before if name in after and not same_tensor(before[name], after[name])
    ]
    return f"it rewrites {', '.join(changed)}" if changed else ""


_SETTLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, also for tensor subclasses that implement no `equal` (torchao's): their inner tensors are."""
    try:
        return torch.equal(a, b)
    except USER_CODE_ERRORS:
        pass
    if type(a) is not type(b) or a.shape != b.shape or not hasattr(a, "__tensor_flatten__"):
        return False
    names, _ = a.__tensor_flatten__()
    return all(same_tensor(getattr(a, name), getattr(b, name)) for name in names)


def merges_by_cast(evidence: Evidence) -> bool:
    """A plain float8 parameter is its own round trip: W + dW cast back to float8 is the merged weight."""
    tensor = _stored(evidence)
    return type(tensor) is torch.nn.Parameter and tensor.dtype.is_floating_point and tensor.element_size() == 1


def peft_has_backend(module) -> bool:
    """PEFT's own answer: whether its `resolve_quantization_backend` (peft 0.21 on) knows the base."""
    try:
        from peft.utils.quantization_utils import resolve_quantization_backend
    except ImportError:
        return False
    try:
        return resolve_quantization_backend(module) is not None
    except USER_CODE_ERRORS:
        return True  # it knows the base, and asks for more (torchao's requantization function)


def _round_trip_name(evidence: Evidence) -> str:
    trip = round_trip_for(evidence.module)
    return trip.requantized.__name__ if trip else ""


def merge_outlook(evidence: Evidence) -> str:
    """What merging will do, with how much of a typical dW (TYPICAL_DELTA of the weight's spread) survives."""
    storage = _storage(evidence)
    trip = None if merges_by_cast(evidence) else round_trip_for(evidence.module)
    if trip is not None:
        kept = round_trip_survival(evidence, trip)
        kept_text = "cannot be measured here" if kept is None else f"keeps {max(0.0, kept):.0%} of a typical dW"
        return (
            f"merging quantizes W + dW again with {trip.library}, which {kept_text} "
            f"({TYPICAL_DELTA:.0e} of the weight's spread); the layer merges only where it loses at most its "
            "merge_tolerance (1%), and unload_dequantized exports float nn.Linear layers instead"
        )
    if not merges_by_cast(evidence):
        return (
            f"merging is refused: no way to write W + dW back into {evidence.weight.name} is known for this class; "
            "unload_dequantized exports float nn.Linear layers instead (exact where the base is linear)"
        )
    weight = _stored(evidence).detach().float()
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * TYPICAL_DELTA * weight.std()
    lost = float(((weight + delta).to(_stored(evidence).dtype).float() - weight - delta).norm() / delta.norm())
    return (
        f"merging casts W + dW back to {storage}, which keeps {max(0.0, 1 - lost):.0%} of a typical dW ({TYPICAL_DELTA:.0e} "
        "of the weight's spread); the layer merges only where it loses at most its merge_tolerance (1%)"
    )


def round_trip_survival(evidence: Evidence, trip: RoundTrip) -> float | None:
    """The share of a typical dW the library's requantization keeps, measured on the base's map as the layer's merge
    measures it (None where the round trip fails here)."""
    module, measured = evidence.module, linear_response(evidence)
    dtype = evidence.call(0)[0][0].dtype
    try:
        weight, bias = base_map(module, measured.in_features, dtype)
        generator = torch.Generator().manual_seed(0)
        delta = torch.randn(weight.shape, generator=generator).to(dtype) * TYPICAL_DELTA * weight.std()
        has_bias = getattr(module, "bias", None) is not None
        merged = trip.requantized(module, weight + delta, bias if has_bias else None)
        kept, _ = base_map(merged, weight.shape[1], dtype)
    except USER_CODE_ERRORS:
        return None
    return 1 - float((kept - weight - delta).norm() / delta.norm())


def base_map(module, in_features: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's map as the generated layer measures it: its weight [out, in] on basis inputs, and its offset."""
    with torch.no_grad():
        offset = module(torch.zeros(1, in_features, dtype=dtype))[0]
        return (module(torch.eye(in_features, dtype=dtype)) - offset).T.contiguous(), offset


def _stored(evidence: Evidence) -> torch.Tensor:
    parameters = dict(evidence.module.named_parameters())
    name = evidence.weight.name
    return parameters[name] if name in parameters else evidence.module.get_buffer(name)


def _first_sentence(text: str, limit: int = 100) -> str:
    sentence = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def _storage(evidence: Evidence) -> str:
    """The weight's storage: its dtype, or the tensor subclass holding quantized data behind a float dtype."""
    kind = type(_stored(evidence))
    if evidence.weight.rounded:
        return f"{evidence.weight.dtype}, {evidence.weight.rounded}"
    return evidence.weight.dtype if kind in (torch.Tensor, torch.nn.Parameter) else kind.__name__


@dataclass(frozen=True)
class LinearResponse:
    """The base measured as a linear map of its input: its sizes, how far it is from `x @ M + b`, and the precision
    of the measure (float64, else float32 where the base does not compute in float64, with why)."""

    in_features: int
    out_features: int
    error: float
    dtype: torch.dtype
    matrix: torch.Tensor | None  # the map [in, out], until the gradient check has used it
    gradient_cosine: float | None = None  # the input gradient's against the map's (None: none reaches the input)
    why_not_float64: str = ""

    def gradient_note(self) -> str:
        """What is wrong with the gradient the base passes to its input ("" when it is the map's)."""
        if self.gradient_cosine is None:
            return "it passes no gradient to its input: adapters before it get none through it"
        if self.gradient_cosine < GRADIENT_COSINE:
            return (
                f"the gradient it passes to its input is not its map's (cosine {self.gradient_cosine:.3f}): "
                "adapters before it train on that"
            )
        return ""


def linear_response(evidence: Evidence) -> LinearResponse | str:
    """The base on its own input, measured in float64 where it runs so, else in float32; or why it cannot be.
    Measured once per built module (judging, the reason and the template answers all ask)."""
    if evidence.module not in _MEASURED:
        _MEASURED[evidence.module] = _linear_response(evidence)
    return _MEASURED[evidence.module]


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_response(evidence: Evidence) -> LinearResponse | str:
    settling(evidence)  # measured as the tests and a model will have it, after its first forward
    args, kwargs = evidence.call(0)
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return "the base takes more than one floating tensor"
    try:
        # Float tensors only: integer storage is kept as it is, float8 values are exact in float64.
        measured = _measured(copy.deepcopy(evidence.module).double(), args[0], torch.float64)
        return measured if isinstance(measured, str) else _with_gradient(measured, evidence.module, args[0])
    except USER_CODE_ERRORS as exc:
        why = _first_sentence(f"{type(exc).__name__}: {exc}")
    try:
        # The module as built: nothing below changes it (hqq's layer cannot be deep-copied at all).
        measured = _measured(evidence.module, args[0], torch.float32)
        if isinstance(measured, str):
            return measured
        return replace(_with_gradient(measured, evidence.module, args[0]), why_not_float64=why)
    except USER_CODE_ERRORS as exc:
        return f"the base does not run on basis inputs ({type(exc).__name__}: {exc})"


def _measured(module, x: torch.Tensor, dtype: torch.dtype) -> LinearResponse | str:
    in_features = x.shape[-1]
    with torch.no_grad():
        bias = module(torch.zeros(1, in_features, dtype=dtype))
        if not isinstance(bias, torch.Tensor) or bias.dim() != 2:
            return "the base's output is not one tensor of features"
        matrix = module(torch.eye(in_features, dtype=dtype)) - bias
        errors = []
        for seed in SEEDS:
            sample = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
            for scale in SCALES:
                got = module(sample * scale) - bias
                expected = (sample * scale) @ matrix
                errors.append(float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)))
    return LinearResponse(in_features, matrix.shape[-1], max(errors), dtype, matrix)


def _with_gradient(measured: LinearResponse, module, x: torch.Tensor) -> LinearResponse:
    """The gradient check on the module as built, fed the dtype the tests feed: a base's float64 path may not be the
    one training takes (bitsandbytes' 4-bit layer passes no gradient to a float64 input, and does to float32)."""
    cosine = _gradient_cosine(module, x, measured.matrix.to(x.dtype))
    return replace(measured, matrix=None, gradient_cosine=cosine)


def input_gradient_note(module, in_features: int) -> str:
    """What is wrong with the gradient a built base passes to its input ("" when it is its map's), on random
    inputs in the dtype it computes in: what `audit` reports per quantized module."""
    dtype = getattr(module, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype):
        floats = [
            t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.element_size() >= 2
        ]
        dtype = floats[0].dtype if floats else torch.get_default_dtype()
    try:
        matrix, _ = base_map(module, in_features, dtype)
        x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        cosine = _gradient_cosine(module, x, matrix.T)
    except USER_CODE_ERRORS as exc:
        return f"its input gradient cannot be checked ({type(exc).__name__})"
    return LinearResponse(in_features, matrix.shape[0], 0.0, dtype, None, cosine).gradient_note()


def _gradient_cosine(module, x: torch.Tensor, matrix: torch.Tensor) -> float | None:
    """How the gradient the base passes back to its input lines up with its map's, `g @ M.T` (1: exactly)."""
    generator = torch.Generator().manual_seed(len(SEEDS))
    sample = torch.randn(x.shape, generator=generator).to(matrix.dtype).requires_grad_(True)
    training = module.training
    try:
        # In training mode, where gradients are taken (bitsandbytes' 4-bit layer repacks its weight for an
        # eval-only CPU kernel, through which no gradient passes).
        output = module.train()(sample)
    except USER_CODE_ERRORS:
        return None
    finally:
        module.train(training)
    if not output.requires_grad:
        return None
    direction = torch.randn(output.shape, generator=generator).to(output.dtype)
    try:
        (gradient,) = torch.autograd.grad((output * direction).sum(), sample, allow_unused=True)
    except USER_CODE_ERRORS:
        return None  # a backward that fails passes nothing back either
    if gradient is None or not gradient.abs().sum() > 0:
        return None
    expected = direction @ matrix.T
    return float(torch.nn.functional.cosine_similarity(gradient.flatten(), expected.flatten(), dim=0))


def feature_attributes(module, in_features: int, out_features: int) -> tuple[str, str] | None:
    """The names of the module's int attributes giving its input and output sizes (the usual names first)."""
    found = []
    for size, usual in zip((in_features, out_features), FEATURE_NAMES):
        names = [n for n in usual if getattr(module, n, None) == size]
        names += sorted(n for n, v in vars(module).items() if type(v) is int and v == size and not n.startswith("_"))
        if not names:
            return None
        found.append(names[0])
    return found[0], found[1]


BESIDE = Beside()
