"""RNN targets: cuDNN keeps their weights in one flattened buffer. On a GPU, a forward with W + dW makes cuDNN copy
the weights and warn on every call, and merging gives the weight new storage outside that buffer. Without a GPU
here, these tests check lora-scaffold's side of it: the warning is silenced only around the adapted forward, and
(un)merging calls flatten_parameters (which re-compacts on a GPU and does nothing on the CPU)."""

import importlib
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_scaffold.cli import main


@pytest.fixture(scope="module")
def gru_layer_module(tmp_path_factory):
    out = tmp_path_factory.mktemp("rnn")
    arguments = ["torch.nn.GRU", "--arg", "input_size=6", "--arg", "hidden_size=8", "--weight", "weight_ih_l0"]
    assert main(["new", *arguments, "-o", str(out), "--name", "rnn_gru"]) == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("lora_rnn_gru")
    finally:
        sys.path.remove(str(out))


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.target = nn.GRU(6, 8)

    def forward(self, x):
        return self.target(x)[0]


def make_model(layer_module):
    torch.manual_seed(0)
    config = layer_module.register(LoraConfig(target_modules=["target"], init_lora_weights=False))
    return get_peft_model(Holder(), config)


def warn_like_cudnn(module, inputs):
    # The text of the UserWarning torch's cuDNN RNN raises.
    warnings.warn(
        "RNN module weights are not part of single contiguous chunk of memory. This means they need to be compacted "
        "at every call, possibly greatly increasing memory usage. To compact weights again call flatten_parameters()."
    )


def flat_weight_warnings(model, x) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
    return [w for w in caught if "single contiguous chunk" in str(w.message)]


def test_adapted_forward_silences_the_flat_weights_warning_only(gru_layer_module):
    model = make_model(gru_layer_module)
    model.base_model.model.target.get_base_layer().register_forward_pre_hook(warn_like_cudnn)
    x = torch.randn(5, 2, 6)
    assert flat_weight_warnings(model, x) == []
    with model.disable_adapter():  # the base forward alone still warns: the silencing is scoped to W + dW
        assert len(flat_weight_warnings(model, x)) == 1


def test_merge_and_unmerge_put_weights_back_into_the_flat_buffer(gru_layer_module, monkeypatch):
    calls = []
    monkeypatch.setattr(nn.GRU, "flatten_parameters", lambda self: calls.append(type(self).__name__))
    model = make_model(gru_layer_module)
    calls.clear()
    model.merge_adapter()
    assert calls == ["GRU"]
    model.unmerge_adapter()
    assert calls == ["GRU", "GRU"]
