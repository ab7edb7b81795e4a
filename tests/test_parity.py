"""Generated layers for types PEFT supports must match PEFT's own layers number for number."""

import copy
import importlib
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners import lora
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_scaffold.cli import main


CASES = {
    "linear": ("torch.nn.Linear", [], lambda: nn.Linear(8, 12), lora.Linear, torch.randn(3, 8)),
    "conv1d": ("torch.nn.Conv1d", [], lambda: nn.Conv1d(4, 6, 3, padding=1), lora.layer.Conv1d, torch.randn(2, 4, 9)),
    "conv2d": (
        "torch.nn.Conv2d",
        [],
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
        lora.Conv2d,
        torch.randn(2, 4, 9, 9),
    ),
    "conv2d_1x1": ("torch.nn.Conv2d", [], lambda: nn.Conv2d(4, 6, 1), lora.Conv2d, torch.randn(2, 4, 5, 5)),
    "embedding": ("torch.nn.Embedding", [], lambda: nn.Embedding(20, 8), lora.Embedding, torch.randint(0, 20, (2, 5))),
    "conv3d": ("torch.nn.Conv3d", [], lambda: nn.Conv3d(2, 3, 2), lora.layer.Conv3d, torch.randn(2, 2, 4, 4, 4)),
    # GPT-2's Conv1D stores its weight [in, out]; PEFT adapts it with lora.Linear and fan_in_fan_out=True.
    "gpt2_conv1d": ("transformers.pytorch_utils.Conv1D", [], lambda: Conv1D(12, 8), lora.Linear, torch.randn(3, 8)),
}
BUILTIN_OPTIONS = {"gpt2_conv1d": {"fan_in_fan_out": True}}
TOLERANCE = {"rtol": 0, "atol": 1e-6}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Generated layer modules, keyed like CASES."""
    out = tmp_path_factory.mktemp("parity")
    modules = {}
    for key, (target, arguments, *_rest) in CASES.items():
        assert main(["new", target, *arguments, "-o", str(out), "--name", f"parity_{key}"]) == 0
    sys.path.insert(0, str(out))
    try:
        for key in CASES:
            modules[key] = importlib.import_module(f"lora_parity_{key}")
    finally:
        sys.path.remove(str(out))
    return modules


def layer_class(module):
    return next(v for k, v in vars(module).items() if k.startswith("LoraParity"))


def build_pair(key, generated, **config_options):
    _, _, make_base, builtin_cls, _ = CASES[key]
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **BUILTIN_OPTIONS.get(key, {}), **config_options)
    torch.manual_seed(0)
    base = make_base()
    builtin = builtin_cls(copy.deepcopy(base), "default", config=config, r=4, lora_alpha=8)
    ours = layer_class(generated[key])(copy.deepcopy(base), "default", config=config, r=4, lora_alpha=8)
    adapter_state = {k: v for k, v in builtin.state_dict().items() if "lora_" in k}
    missing, unexpected = ours.load_state_dict(adapter_state, strict=False)
    assert not unexpected and all("lora_" not in name for name in missing)
    return builtin, ours


@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_delta_and_merged_weight_equal_peft(key, use_rslora, generated):
    builtin, ours = build_pair(key, generated, use_rslora=use_rslora)
    x = CASES[key][4]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), builtin(x), **TOLERANCE)
        torch.testing.assert_close(ours.get_delta_weight("default"), builtin.get_delta_weight("default"), **TOLERANCE)
        builtin.merge()
        ours.merge()
        torch.testing.assert_close(ours.get_base_layer().weight, builtin.get_base_layer().weight, **TOLERANCE)
        torch.testing.assert_close(ours(x), builtin(x), **TOLERANCE)
    assert (ours.in_features, ours.out_features) == (builtin.in_features, builtin.out_features)


@pytest.mark.parametrize("key", ["linear", "conv2d"])
def test_lora_bias_matches_peft(key, generated):
    builtin, ours = build_pair(key, generated, lora_bias=True)
    with torch.no_grad():
        builtin.lora_B["default"].bias.normal_()
        ours.lora_B["default"].bias.copy_(builtin.lora_B["default"].bias)
        x = CASES[key][4]
        torch.testing.assert_close(ours(x), builtin(x), **TOLERANCE)
        builtin.merge()
        ours.merge()
        torch.testing.assert_close(ours.get_base_layer().bias, builtin.get_base_layer().bias, **TOLERANCE)


class Holder(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x):
        return self.target(x)


@pytest.mark.parametrize("key", list(CASES))
def test_adapter_saved_with_peft_loads_into_the_generated_layer(key, generated, tmp_path):
    _, _, make_base, builtin_cls, x = CASES[key]
    torch.manual_seed(0)
    base = Holder(make_base())
    trained = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["target"], init_lora_weights=False))
    assert isinstance(trained.base_model.model.target, builtin_cls)
    trained.save_pretrained(tmp_path)
    config = generated[key].register(LoraConfig.from_pretrained(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=config)
    assert isinstance(loaded.base_model.model.target, layer_class(generated[key]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), **TOLERANCE)


@pytest.mark.parametrize("key", ["linear", "gpt2_conv1d", "conv1d", "conv2d", "conv2d_1x1", "conv3d"])
@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
def test_dora_matches_peft(key, lora_dropout, generated):
    builtin, ours = build_pair(key, generated, use_dora=True, lora_dropout=lora_dropout)
    assert type(ours.lora_variant["default"]) is type(builtin.lora_variant["default"])
    magnitude = builtin.lora_magnitude_vector["default"].weight
    scale = torch.linspace(0.5, 1.5, magnitude.numel()).reshape(magnitude.shape)
    x = CASES[key][4]
    with torch.no_grad():
        for layer in (builtin, ours):
            layer.lora_magnitude_vector["default"].weight.mul_(scale)
    for layer in (builtin, ours):  # with dropout, DoRA recomputes the base output from the dropped-out input
        torch.manual_seed(1)
        layer.train()(x).pow(2).sum().backward()
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0
    torch.testing.assert_close(ours.lora_magnitude_vector["default"].weight.grad, magnitude.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), builtin.eval()(x), **TOLERANCE)
        for safe_merge in (True, False):
            builtin.merge(safe_merge=safe_merge)
            ours.merge(safe_merge=safe_merge)
            torch.testing.assert_close(ours.get_base_layer().weight, builtin.get_base_layer().weight, **TOLERANCE)
            torch.testing.assert_close(ours(x), builtin(x), **TOLERANCE)
            builtin.unmerge()
            ours.unmerge()
            torch.testing.assert_close(ours.get_base_layer().weight, builtin.get_base_layer().weight, **TOLERANCE)


@pytest.mark.parametrize("key", ["linear", "conv2d"])
def test_dora_refuses_mixed_batches_as_peft_does(key, generated):
    x = CASES[key][4]
    for layer in build_pair(key, generated, use_dora=True):
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            layer(x, adapter_names=["default"] * len(x))
