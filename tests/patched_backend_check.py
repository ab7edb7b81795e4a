"""Run against a checkout patched for optimum-quanto's QLinear (PYTHONPATH=<checkout>/src): PEFT's
resolve_quantization_backend returns the generated backend, and PEFT's OFT, which merges quantized bases through
their backend, merges into a QLinear that stays quantized and computes what the adapted model did (unpatched, its
merge changes nothing)."""

import torch
from peft import OFTConfig, get_peft_model
from peft.utils.quantization_utils import resolve_quantization_backend
from quantized_layers import quanto_linear
from torch import nn


torch.manual_seed(0)
model = nn.Sequential(quanto_linear(8), nn.Linear(8, 4))
backend = resolve_quantization_backend(model[0])
assert type(backend).__name__ == "LoraQLinearBackend" and backend.supports_merge, backend
x = torch.randn(3, 16)
with torch.no_grad():
    base_output = model(x)
peft_model = get_peft_model(model, OFTConfig(target_modules=["0"], oft_block_size=4, r=0, init_weights=False))
layer = peft_model.base_model.model[0]
assert type(layer.quantization_backend).__name__ == "LoraQLinearBackend"
with torch.no_grad():
    adapted = peft_model(x)
    scale = float(adapted.abs().max())
    assert float((adapted - base_output).abs().max()) > 0.1 * scale  # the adapter moves the output
    layer.merge()
    assert type(layer.get_base_layer().weight).__name__ == "WeightQBytesTensor"  # quantized again, by quanto
    # Requantized at 8 bits: within a percent of the output's scale.
    assert float((peft_model(x) - adapted).abs().max()) < 0.02 * scale
    layer.unmerge()
    assert float((peft_model(x) - adapted).abs().max()) < 0.02 * scale
print("OFT merges through the generated backend")
