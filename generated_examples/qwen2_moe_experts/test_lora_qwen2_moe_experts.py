"""Tests for `LoraQwen2MoeExperts`, written by lora-scaffold 0.1.0 for peft >= 0.21.

They need only torch, peft and pytest.
"""

import contextlib
import copy
import functools
import inspect
import math
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from lora_qwen2_moe_experts import LoraQwen2MoeExperts, register
from peft import LoraConfig, PeftModel, get_peft_model


RANK = 4
RTOL, ATOL = 1e-4, 1e-5


def make_target() -> nn.Module:
    return transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2MoeConfig(
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            vocab_size=64,
        )
    ).get_submodule("model.layers.0.mlp.experts")


class Captured(BaseException):
    """Ends the model's forward once the target's call is recorded (passing any `except Exception` on the way)."""


@functools.cache
def recorded_call() -> tuple[tuple, dict]:
    """What the model passes to the target in one forward, recorded by a forward pre-hook: the input lora-scaffold
    probed the layer on. Arguments that can be positional are made positional."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen2MoeConfig(
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            vocab_size=64,
        )
    )
    model.eval()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # a key-value cache would change the next call
    calls = []

    def record(module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        calls.append(copy.deepcopy((bound.args, bound.kwargs)))
        raise Captured

    model.get_submodule("model.layers.0.mlp.experts").register_forward_pre_hook(record, with_kwargs=True)
    torch.manual_seed(0)
    fed = {"input_ids": torch.randint(0, 64, (2, 8))}
    args, kwargs = ((), fed) if isinstance(fed, dict) else (fed if isinstance(fed, tuple) else (fed,), {})
    with torch.no_grad(), contextlib.suppress(Captured):
        model(*args, **kwargs)
    return calls[0]


def captured_call() -> tuple[tuple, dict]:
    return copy.deepcopy(recorded_call())


def make_inputs() -> tuple:
    return captured_call()[0]


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.target = make_target()

    def forward(self, *inputs, **kwargs):
        return self.target(*inputs, **kwargs)


def make_base(dtype: torch.dtype = torch.float32) -> Wrapper:
    torch.manual_seed(0)
    # As built for float32 (`.to` would turn a float8 weight into float32 too), cast for another dtype.
    base = Wrapper() if dtype == torch.float32 else Wrapper().to(dtype)
    return base


def make_config(**kwargs) -> LoraConfig:
    return register(LoraConfig(target_modules=["target"], r=RANK, **kwargs))


def make_model(dtype: torch.dtype = torch.float32, autocast_adapter_dtype: bool = True, **kwargs) -> PeftModel:
    return get_peft_model(make_base(dtype), make_config(**kwargs), autocast_adapter_dtype=autocast_adapter_dtype)


def tensors(output) -> list[torch.Tensor]:
    """Every tensor of an output: a tensor, or tuples and dicts of them (as RNNs and routers return)."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [tensor for item in items for tensor in tensors(item)]


def flatten(output) -> torch.Tensor:
    """Every tensor of an output as one vector."""
    return torch.cat([tensor.flatten() for tensor in tensors(output)])


def floating(output) -> torch.Tensor:
    """Every floating tensor of an output as one vector (a router's expert indices left out)."""
    return torch.cat([tensor.flatten() for tensor in tensors(output) if tensor.is_floating_point()])


def cast(value, dtype: torch.dtype):
    """Floating tensors of an input (a tensor, or tuples and lists of them as LSTMCell takes) to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast(item, dtype) for item in value)
    return value


def run(model: nn.Module, dtype: torch.dtype | None = None, **kwargs) -> torch.Tensor:
    inputs = make_inputs()
    if dtype is not None:
        inputs = cast(inputs, dtype)
    with torch.no_grad():
        return flatten(model(*inputs, **kwargs))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


LAYER_FILE = inspect.getfile(LoraQwen2MoeExperts)


def layer_warnings(action) -> list[str]:
    """The warnings the layer's own module gives while `action` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(warning.message) for warning in caught if warning.filename == LAYER_FILE]


def moved(actual: torch.Tensor, baseline: torch.Tensor) -> bool:
    """Whether an output moved beyond float32 rounding, at its own scale (a module whose outputs are tiny), where
    the baseline is finite (a mask's -inf stays -inf)."""
    finite = torch.isfinite(baseline)
    change = (actual - baseline)[finite].abs()
    return bool(change.numel()) and bool(change.max() > 1e-5 * baseline[finite].abs().max() or change.isnan().any())


def load_saved(path, **options) -> PeftModel:
    config = register(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(make_base(), path, config=config, **options)


def lora_layer(model: PeftModel) -> LoraQwen2MoeExperts:
    return model.base_model.model.target


def base_weight(layer: LoraQwen2MoeExperts) -> torch.Tensor:
    module = layer.get_base_layer()
    for name in ["gate_up_proj"]:
        module = getattr(module, name)
    return module


def base_state(model: PeftModel) -> dict[str, torch.Tensor]:
    # Cloned, not deep-copied: some bases hold tensors that refuse deepcopy (hqq's quantization metadata).
    return {name: tensor.detach().clone() for name, tensor in lora_layer(model).get_base_layer().state_dict().items()}


def test_dispatch_picks_the_lora_layer():
    layer = lora_layer(make_model())
    assert isinstance(layer, LoraQwen2MoeExperts)
    base = layer.get_base_layer()
    assert isinstance(base, Qwen2MoeExperts)
    # What the model around reads off the module the layer replaced is still there (one set later too), and a child
    # PEFT wraps later is set on the module it belongs to.
    base.set_after_wrapping = object()
    for name, value in vars(base).items():
        if not name.startswith("_") and name not in vars(layer) and not hasattr(type(layer), name):
            assert getattr(layer, name) is value, name
    for name, child in list(base.named_children()):
        assert getattr(layer, name) is child
        stand_in = nn.Module()
        setattr(layer, name, stand_in)
        assert base._modules[name] is stand_in and name not in layer._modules, name
        setattr(layer, name, child)
    assert repr(layer).startswith("lora.LoraQwen2MoeExperts(")


def test_default_init_keeps_output():
    outputs = []
    assert layer_warnings(lambda: outputs.append(run(make_model()))) == []  # and there is nothing to warn of
    assert torch.equal(outputs[0], run(make_base()))


def test_random_init_changes_output():
    assert moved(run(make_model(init_lora_weights=False)), run(make_base()))


def test_merged_output_equals_unmerged():
    model = make_model(init_lora_weights=False)
    unmerged = run(model)
    model.merge_adapter()
    assert lora_layer(model).merged
    assert_close(run(model), unmerged)


def test_unmerge_restores_base_weights():
    model = make_model(init_lora_weights=False)
    before = base_state(model)
    model.merge_adapter()
    model.unmerge_adapter()
    assert not lora_layer(model).merged
    for name, tensor in base_state(model).items():
        assert_close(tensor, before[name])
    with pytest.warns(UserWarning, match="Already unmerged"):
        lora_layer(model).unmerge()


def test_merge_and_unload_returns_plain_target():
    model = make_model(init_lora_weights=False)
    expected = run(model)
    unloaded = model.merge_and_unload()
    assert isinstance(unloaded.target, Qwen2MoeExperts)
    # Not a LoRA layer, and of the class the target is built as (torch gives each parametrized module its own).
    assert type(unloaded.target).__qualname__ == type(make_target()).__qualname__
    assert_close(run(unloaded), expected)


def test_safe_merge_rejects_nan_adapter():
    model = make_model(init_lora_weights=False)
    before = base_state(model)
    with torch.no_grad():
        next(p for name, p in lora_layer(model).named_parameters() if "lora_" in name).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        lora_layer(model).merge(safe_merge=True)  # PeftModel.merge_adapter takes safe_merge from peft 0.16 on
    assert not lora_layer(model).merged
    for name, tensor in base_state(model).items():
        assert torch.equal(tensor, before[name])


def test_disable_adapter_gives_base_output():
    model = make_model(init_lora_weights=False)
    expected, before = run(make_base()), base_state(model)
    with model.disable_adapter():
        assert torch.equal(run(model), expected)
    # Merged, the adapter comes out of the base first.
    model.merge_adapter()
    with model.disable_adapter():
        assert_close(run(model), expected)
    assert not lora_layer(model).merged
    for name, tensor in base_state(model).items():
        assert_close(tensor, before[name])


def test_only_lora_parameters_train_and_all_get_gradients():
    model = make_model(init_lora_weights=False)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    flatten(model(*make_inputs())).pow(2).sum().backward()
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Built alone (as PEFT's lower-level API may), an adapter made for inference does not train.
    config = make_config(inference_mode=True)
    alone = LoraQwen2MoeExperts(make_target(), "default", config=config, r=RANK, lora_alpha=8)
    assert not any(p.requires_grad for name, p in alone.named_parameters() if "lora_" in name)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_load_roundtrip(tmp_path, low_cpu_mem_usage):
    model = make_model(init_lora_weights=False)
    expected = run(model)
    model.save_pretrained(tmp_path)
    # low_cpu_mem_usage creates the adapter on the meta device and assigns the saved tensors to it
    loaded = load_saved(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(lora_layer(loaded), LoraQwen2MoeExperts)
    assert not any(parameter.is_meta for parameter in loaded.parameters())
    assert_close(run(loaded), expected)


def test_factored_path_equals_the_forward_with_w_plus_dw():
    """In training the layer runs its base with W as it is and adds the low-rank term to each product of an input
    with W or a slice of it: in float32, its outputs and the factors' gradients are those of the base run
    with W + dW."""
    model = make_model(dtype=torch.float32, autocast_adapter_dtype=False, init_lora_weights=False).train()
    layer = lora_layer(model)
    inputs = cast(make_inputs(), torch.float32)
    factors = [p for name, p in layer.named_parameters() if "lora_" in name]
    factored = flatten(layer(*inputs))
    weight = {"gate_up_proj": base_weight(layer) + layer.get_delta_weight("default")}
    materialised = flatten(torch.func.functional_call(layer.get_base_layer(), weight, inputs))
    readout = torch.randn(factored.shape, dtype=factored.dtype, generator=torch.Generator().manual_seed(0))
    gradients = zip(
        torch.autograd.grad((factored * readout).sum(), factors),
        torch.autograd.grad((materialised * readout).sum(), factors),
    )
    for got, expected in [(factored, materialised), *gradients]:
        # Within the proof's tolerance of each tensor's scale: long float32 sums in another order differ in their
        # last bits.
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-05 * float(expected.detach().abs().max()))


def test_two_adapters_switch_and_one_deletes():
    model = make_model(init_lora_weights=False)
    first = run(model)
    model.add_adapter("other", make_config(init_lora_weights=False))
    assert_close(run(model), first)  # adding an adapter leaves the active one as it was
    layer = lora_layer(model)
    assert not any(p.requires_grad for name, p in layer.named_parameters() if ".other" in name)  # it is not active
    model.set_adapter("other")
    second = run(model)
    assert moved(first, second)
    model.set_adapter("default")
    assert_close(run(model), first)
    model.delete_adapter("other")
    for name in layer.adapter_layer_names + layer.other_param_names:
        assert "other" not in getattr(layer, name), name
    assert_close(run(model), first)


def test_two_active_adapters_apply_together_and_merge_together():
    model = make_model(init_lora_weights=False)
    model.add_adapter("other", make_config(init_lora_weights=False))
    singles = [run(model)]
    model.set_adapter("other")
    singles.append(run(model))
    model.base_model.set_adapter(["default", "other"])
    both = run(model)
    assert all(moved(both, single) for single in singles)
    model.merge_adapter(["default", "other"])
    assert_close(run(model), both)


def stacked(config: LoraConfig) -> LoraConfig:
    """`config` dispatching the target to the layer stacked on itself, as a model package of `lora-scaffold scan
    --generate` stacks one layer a weight on a module whose class has several: the same weight twice stands in for
    the other weight's layer."""

    def stack(target: nn.Module, adapter_name: str, **kwargs) -> LoraQwen2MoeExperts:
        return LoraQwen2MoeExperts(LoraQwen2MoeExperts(target, adapter_name, **kwargs), adapter_name, **kwargs)

    config._register_custom_module({Qwen2MoeExperts: stack})
    return config


def stacked_output(layer: LoraQwen2MoeExperts, adapter: str) -> torch.Tensor:
    """The plain base's output with W plus the change each stacked layer's `adapter` makes."""
    weight = base_weight(layer)
    while isinstance(layer, LoraQwen2MoeExperts):
        weight = weight + layer.get_delta_weight(adapter)
        layer = layer.base_layer
    with torch.no_grad():
        return flatten(torch.func.functional_call(make_base().eval(), {"target.gate_up_proj": weight}, make_inputs()))


def test_stacked_layers_apply_add_adapters_save_and_merge_together(tmp_path):
    model = get_peft_model(make_base(), stacked(make_config(init_lora_weights=False))).eval()
    outer = lora_layer(model)
    inner = outer.base_layer
    assert isinstance(inner, LoraQwen2MoeExperts) and inner.get_base_layer() is outer.get_base_layer()
    expected = stacked_output(outer, "default")
    assert moved(expected, stacked_output(inner, "default"))
    assert_close(run(model), expected)
    model.add_adapter("other", stacked(make_config(init_lora_weights=False)))  # PEFT adds it to the outer layer
    model.set_adapter("other")
    assert_close(run(model), stacked_output(outer, "other"))
    model.set_adapter("default")
    model.save_pretrained(tmp_path)
    config = stacked(LoraConfig.from_pretrained(tmp_path))
    loaded = PeftModel.from_pretrained(make_base(), tmp_path, config=config).eval()
    assert_close(run(loaded), expected)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(module, LoraQwen2MoeExperts) for module in merged.modules())
    assert_close(run(merged), expected)


def nudge(weight: torch.Tensor) -> None:
    """A random change at the weight's own spread (1 where it is constant: a table initialised to zeros)."""
    spread = float(weight.std()) if weight.numel() > 1 else 0.0
    weight.add_(torch.randn_like(weight) * (spread or 1.0))


def test_eval_weight_cache_follows_every_change():
    # In eval without autograd the layer reuses W + dW; with autograd on, it computes it anew.
    def fresh(model):
        return flatten(model(*make_inputs())).detach()

    def assert_close(actual, expected):  # with autograd on, the factored path: float32 sums in another order
        atol = max(ATOL, 1e-05 * float(expected.abs().max()))
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)

    model = make_model(init_lora_weights=False).eval()
    model.add_adapter("other", make_config(init_lora_weights=False))
    layer = lora_layer(model)
    first = run(model)
    assert layer._weight_cache is not None
    assert torch.equal(run(model), first)
    changes = [
        lambda: layer.lora_B["default"].weight.mul_(2),  # an optimizer step writes in place
        lambda: nudge(base_weight(layer)),
        lambda: layer.set_scale("default", 0.5),
        lambda: layer.set_scale("default", -0.5),  # the adapter negated (task arithmetic's "forget")
        lambda: model.base_model.set_adapter("other"),
        lambda: model.base_model.set_adapter(["default", "other"]),
    ]
    for change in changes:
        before = run(model)
        with torch.no_grad():
            change()
        after = run(model)
        assert moved(after, before)
        assert_close(after, fresh(model))
    model.merge_adapter(["default", "other"])
    assert_close(run(model), after)
    model.unmerge_adapter()
    assert_close(run(model), fresh(model))
    model.train()
    assert layer._weight_cache is None


def test_lora_dropout_acts_in_training_only():
    # No dropout is an Identity, which PEFT's DoRA reads as "reuse the base output".
    assert isinstance(lora_layer(make_model()).lora_dropout["default"], nn.Identity)
    model = make_model(init_lora_weights=False, lora_dropout=0.5)
    model.train()
    inputs = make_inputs()
    assert moved(flatten(model(*inputs)), flatten(model(*inputs)))
    model.eval()
    unmerged = run(model)
    model.merge_adapter()
    assert_close(run(model), unmerged)


def test_rslora_scaling():
    rslora = lora_layer(make_model(lora_alpha=8, use_rslora=True))
    assert rslora.scaling["default"] == pytest.approx(8 / math.sqrt(RANK))
    rslora.set_scale("default", 0.5)  # PEFT's set_scale reads the layer's use_rslora
    assert rslora.scaling["default"] == pytest.approx(0.5 * 8 / math.sqrt(RANK))
    plain = lora_layer(make_model(lora_alpha=8))
    assert plain.scaling["default"] == pytest.approx(8 / RANK)
    plain.set_scale("default", 0.5)  # as PEFT's LoRA model scales an adapter: from its lora_alpha and r
    assert plain.scaling["default"] == pytest.approx(0.5 * 8 / RANK)


def test_bf16_forward_is_finite_and_near_float32():
    inputs = cast(make_inputs(), torch.bfloat16)
    try:
        with torch.no_grad():
            expected = tensors(make_base(torch.bfloat16)(*inputs))
    except (RuntimeError, ValueError) as exc:  # a quantized base may refuse another dtype (quanto's)
        pytest.skip(f"the plain Qwen2MoeExperts cannot run in bfloat16 here: {exc}")
    model, reference = make_model(dtype=torch.bfloat16, init_lora_weights=False), make_model(init_lora_weights=False)
    for mode in ("train", "eval"):
        with torch.no_grad():
            outputs = tensors(getattr(model, mode)()(*inputs))
            plain = floating(getattr(make_base(torch.bfloat16), mode)()(*inputs)).float()
            reference_output = floating(getattr(reference, mode)()(*make_inputs()))
            reference_change = reference_output - floating(getattr(make_base(), mode)()(*make_inputs()))
        # Each output in the dtype the plain module gives it (a router's scores may stay in float32).
        assert [tensor.dtype for tensor in outputs] == [tensor.dtype for tensor in expected]
        # Finite wherever the plain module's output is (a mask's -inf is the module's own).
        pairs = [(ours, plain) for ours, plain in zip(outputs, expected) if ours.is_floating_point()]
        assert all((torch.isfinite(ours) | ~torch.isfinite(plain)).all() for ours, plain in pairs)
        # What the adapter changes is what it changes in float32, within bfloat16's rounding, nearly everywhere (a
        # router's top-k may pick another expert where two scores are within rounding of each other).
        change = floating(outputs).float() - plain
        finite = torch.isfinite(reference_change) & torch.isfinite(change)
        tolerance = 0.1 * reference_change[finite].abs() + 2**-6 * reference_output[finite].abs().max()
        near = (change - reference_change)[finite].abs() <= tolerance
        assert near.float().mean() >= 0.9, (mode, float(near.float().mean()))
    # The eval forward kept W + dW of the float32 adapter (PEFT's autocast) in the bfloat16 weight's dtype.
    assert lora_layer(model)._weight_cache[1].dtype == base_weight(lora_layer(model)).dtype


def test_fp16_merge_on_cpu():
    model = make_model(dtype=torch.float16, autocast_adapter_dtype=False, init_lora_weights=False)
    layer = lora_layer(model)
    expected = base_weight(layer).float() + layer.get_delta_weight("default").float()
    model.merge_adapter()
    merged = base_weight(layer)
    assert merged.dtype == torch.float16
    torch.testing.assert_close(merged.float(), expected, rtol=1e-2, atol=1e-2)
    for dtype in (torch.float16, torch.bfloat16):
        # Merging a float32 adapter (PEFT's autocast) into a half-precision base keeps every base tensor's dtype.
        model = make_model(dtype=dtype, init_lora_weights=False)
        dtypes = {name: tensor.dtype for name, tensor in base_state(model).items()}
        for step in (model.merge_adapter, model.unmerge_adapter):
            step()
            assert {name: tensor.dtype for name, tensor in base_state(model).items()} == dtypes


def test_half_precision_adapter_computes_its_change_in_float32():
    for dtype in (torch.float16, torch.bfloat16):
        layer = lora_layer(make_model(dtype=dtype, autocast_adapter_dtype=False, init_lora_weights=False))
        expected_dtype = dtype  # the adapter takes the base's dtype
        factors = [p for name, p in layer.named_parameters() if "lora_" in name]
        assert all(p.dtype == expected_dtype for p in factors)
        # On CPU its change is computed in float32, then rounded once.
        layer.scaling["default"] = 0.3  # not a power of two: rounding the product before scaling it would show
        delta = layer.get_delta_weight("default")
        for factor in factors:
            factor.data = factor.data.float()
        assert torch.equal(delta, layer.get_delta_weight("default").to(expected_dtype))


def test_a_partitioned_or_sharded_weight_is_refused():
    # W + dW is built before the base module runs: a weight DeepSpeed ZeRO-3 keeps partitioned (ds_id), or FSDP
    # sharded (device_mesh), at that point is refused, when the layer is built and at each forward.
    for marker, message in (("ds_id", "DeepSpeed"), ("device_mesh", "sharded")):
        base = make_base()
        weight = base.target
        for name in ["gate_up_proj"]:
            weight = getattr(weight, name)
        setattr(weight, marker, 0)
        with pytest.raises(ValueError, match=message):
            get_peft_model(base, make_config())
        model = make_model(init_lora_weights=False)
        setattr(base_weight(lora_layer(model)), marker, 0)
        for mode in ("train", "eval"):
            with pytest.raises(ValueError, match=message), torch.set_grad_enabled(mode == "train"):
                getattr(model, mode)()(*make_inputs())


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        LoraQwen2MoeExperts(make_target(), "default", config=make_config(), r=0, lora_alpha=1)


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param({"use_dora": True}, "no DoRA", id="use_dora"),
        pytest.param({"init_lora_weights": "pissa"}, "supports init_lora_weights", id="pissa"),
        pytest.param({"lora_bias": True}, "lora_bias", id="lora_bias"),
    ],
)
def test_unsupported_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        make_model(**options)


def test_mixed_batch_is_rejected():
    model = make_model(init_lora_weights=False).eval()
    # The leading size of the first tensor input with one (a target may take a plain int first: a sequence length).
    batch = next((len(x) for x in tensors(make_inputs()) if x.dim() > 0), 1)
    with pytest.raises(ValueError, match="adapter_names"):
        run(model, adapter_names=["default"] * batch)
