"""Generated layers and DeepSpeed ZeRO-3's partitioned parameters, through a stand-in.

DeepSpeed does not run here (no accelerator it supports), so `FakeZero3` partitions parameters the way ZeRO-3
does: the local tensor becomes empty, `ds_id`/`ds_shape`/`ds_status` describe the real one, and
`deepspeed.zero.GatheredParameters` brings the full tensors back for the length of a `with` (keeping changes when
`modifier_rank` is set). PEFT's `gather_params_ctx` calls it once ZeRO-3 is enabled; the generated layers must read
the base weight through it wherever they read it outside forward. Forward itself is gathered by DeepSpeed's module
hooks, which the stand-in does not imitate.
"""

import contextlib
import sys
import types

import peft.utils.integrations
import pytest
import torch
from distributed_driver import Holder, load_layer_module
from peft import LoraConfig, get_peft_model

from lora_scaffold.request import Request
from lora_scaffold.workflow import new_plugin
from mypkg import MyConv


class FakeZero3:
    def __init__(self):
        self.full: dict[int, torch.Tensor] = {}

    def partition(self, parameter: torch.nn.Parameter) -> None:
        parameter.ds_id = len(self.full)
        parameter.ds_shape = parameter.shape
        self.full[parameter.ds_id] = parameter.data.clone()
        self._release(parameter)

    @contextlib.contextmanager
    def GatheredParameters(self, parameters, modifier_rank=None, fwd_module=None, enabled=True):  # noqa: N802
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        gathered = [p for p in parameters if getattr(p, "ds_status", None) == "NOT_AVAILABLE"]
        for parameter in gathered:
            parameter.data = self.full[parameter.ds_id].clone()
            parameter.ds_status = "AVAILABLE"
        try:
            yield
        finally:
            for parameter in gathered:
                if modifier_rank is not None:
                    self.full[parameter.ds_id] = parameter.data.clone()
                self._release(parameter)

    @staticmethod
    def _release(parameter: torch.nn.Parameter) -> None:
        parameter.data = torch.empty(0, dtype=parameter.dtype)
        parameter.ds_status = "NOT_AVAILABLE"


@pytest.fixture
def zero3(monkeypatch):
    fake = FakeZero3()
    monkeypatch.setattr(peft.utils.integrations, "check_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=fake))
    return fake


def generated(tmp_path, target: str, *args: str):
    outcome = new_plugin(Request(target, args=args), tmp_path / "layer")
    outcome.apply()
    layer_file = next(c.path for c in outcome.changes if c.path.name.startswith("lora_") and c.path.suffix == ".py")
    return load_layer_module(str(layer_file))


def partitioned_model(zero3: FakeZero3, layer_module, base: torch.nn.Module):
    """Partitioned as zero.Init builds the model, wrapped by PEFT, the adapter partitioned by the engine."""
    for parameter in base.parameters():
        zero3.partition(parameter)
    config = layer_module.register(LoraConfig(target_modules=["layer"], r=4, init_lora_weights=False))
    model = get_peft_model(Holder(base), config)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            zero3.partition(parameter)
    return model, model.base_model.model.layer


def test_factored_layer_reads_partitioned_weights_through_gather_params_ctx(zero3, tmp_path):
    layer_module = generated(tmp_path, "mypkg.MyConv", "in_channels=4", "out_channels=6")
    torch.manual_seed(0)
    base = MyConv(4, 6)
    original = base.weight.detach().clone()
    model, layer = partitioned_model(zero3, layer_module, base)
    assert (layer.in_features, layer.out_features) == (4, 6)  # from ds_shape: the local weight is empty
    delta = layer.get_delta_weight("default")
    assert delta.shape == original.shape and delta.abs().sum() > 0
    model.merge_adapter()
    weight = layer.get_base_layer().weight
    assert weight.numel() == 0, "merge leaves the weight partitioned again"
    with zero3.GatheredParameters([weight]):
        torch.testing.assert_close(weight, original + delta)
    model.unmerge_adapter()
    with zero3.GatheredParameters([weight]):
        torch.testing.assert_close(weight, original)


def test_delta_layer_refuses_a_partitioned_weight(zero3, tmp_path):
    layer_module = generated(tmp_path, "torch.nn.Bilinear")
    with pytest.raises(ValueError, match="does not support DeepSpeed ZeRO-3"):
        partitioned_model(zero3, layer_module, torch.nn.Bilinear(5, 7, 12))
