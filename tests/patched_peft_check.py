"""Run against a patched peft checkout (PYTHONPATH=<checkout>/src): plain get_peft_model must dispatch the
generated layers, without _register_custom_module, DoRA must go through PEFT's variant, and merging must keep the
output."""

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraConvTranspose2d, LoraPlainLinear, LoraSquaredConv
from scaffold_targets import PlainLinear, SquaredConv
from torch import nn


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2)
        self.squared = SquaredConv(6, 5, 3, padding=1)
        self.head = PlainLinear(225, 3)

    def forward(self, x):
        return self.head(self.squared(self.up(x)).flatten(2))


def check_merge_keeps_output(config: LoraConfig) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Three(), config)
    layers = model.base_model.model
    for name, expected in (("up", LoraConvTranspose2d), ("squared", LoraSquaredConv), ("head", LoraPlainLinear)):
        if name in config.target_modules:
            assert isinstance(getattr(layers, name), expected), type(getattr(layers, name))
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            assert not torch.allclose(model(x), adapted)
        head = layers.head
        merged = model.merge_and_unload()
        assert type(merged.up) is nn.ConvTranspose2d and type(merged.squared) is SquaredConv
        assert type(merged.head) is PlainLinear
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)
    return head


check_merge_keeps_output(LoraConfig(target_modules=["up", "squared", "head"], init_lora_weights=False))
dora_head = check_merge_keeps_output(LoraConfig(target_modules=["head"], init_lora_weights=False, use_dora=True))
assert type(dora_head.lora_variant["default"]).__name__ == "DoraLinearVariant", dora_head.lora_variant
print("dispatch and merge ok")
