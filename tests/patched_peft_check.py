"""Run against a patched peft checkout (PYTHONPATH=<checkout>/src): plain get_peft_model must dispatch both
generated layers, without _register_custom_module, and merging must keep the output."""

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraConvTranspose2d, LoraSquaredConv
from scaffold_targets import SquaredConv
from torch import nn


class Both(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2)
        self.squared = SquaredConv(6, 5, 3, padding=1)

    def forward(self, x):
        return self.squared(self.up(x))


torch.manual_seed(0)
model = get_peft_model(Both(), LoraConfig(target_modules=["up", "squared"], init_lora_weights=False))
assert isinstance(model.base_model.model.up, LoraConvTranspose2d), type(model.base_model.model.up)
assert isinstance(model.base_model.model.squared, LoraSquaredConv), type(model.base_model.model.squared)
x = torch.randn(2, 4, 7, 7)
with torch.no_grad():
    adapted = model(x)
    with model.disable_adapter():
        assert not torch.allclose(model(x), adapted)
    merged = model.merge_and_unload()
    assert type(merged.up) is nn.ConvTranspose2d and type(merged.squared) is SquaredConv
    torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
print("dispatch and merge ok")
