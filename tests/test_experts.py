"""The `experts` strategy on transformers' MixtralExperts (`gate_up_proj [experts, 2 * intermediate, hidden]`),
compared with PEFT's own `LoraConfig(target_parameters=[...])` (ParamWrapper) on the same module: the same factor
layout, so the same adapter gives the same outputs at init, after a step and merged."""

import importlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_real_layers import MIXTRAL_EXPERTS, ROUTED_TOKENS
from torch import nn

from lora_scaffold.request import Request
from lora_scaffold.workflow import new_plugin


TARGET = "transformers.models.mixtral.modeling_mixtral.MixtralExperts"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    request = Request(TARGET, init=MIXTRAL_EXPERTS, weight="gate_up_proj", example_input=ROUTED_TOKENS)
    outcome = new_plugin(request, folder)
    outcome.apply()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        module = importlib.import_module("lora_mixtral_experts")
    return outcome.report.plan, module


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        torch.manual_seed(0)
        self.experts = MixtralExperts(MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=3))
        with torch.no_grad():  # left torch.empty by the constructor, as the model's init would fill them
            for parameter in self.experts.parameters():
                parameter.normal_(std=0.02)

    def forward(self, *inputs):
        return self.experts(*inputs)


def routed_tokens() -> tuple:
    torch.manual_seed(1)
    return eval(ROUTED_TOKENS, {"torch": torch})  # noqa: S307


def both(module, **options) -> tuple[nn.Module, nn.Module]:
    """PEFT's ParamWrapper and the generated layer on the same module, with the same options."""
    theirs = get_peft_model(Holder(), LoraConfig(target_parameters=["gate_up_proj"], r=4, **options))
    ours = get_peft_model(Holder(), module.register(LoraConfig(target_modules=["experts"], r=4, **options)))
    return theirs, ours


def lora_pairs(theirs, ours):
    wrapper = next(m for m in theirs.modules() if type(m).__name__ == "ParamWrapper")
    layer = ours.base_model.model.experts
    return [(getattr(wrapper, f)["default"].weight, getattr(layer, f)["default"].weight) for f in ("lora_A", "lora_B")]


def test_auto_chooses_experts_because_of_num_experts(generated):
    plan, _ = generated
    assert plan.decision.strategy == "experts"
    assert "stacking 3 experts (`num_experts` = 3)" in plan.decision.reason


def test_trains_on_the_factored_path_proven_in_float64(generated):
    plan, module = generated
    assert plan.decision.factored_dtype == "float64"
    assert "adds the low-rank term to each of its" in plan.decision.reason
    assert "class FactoredWeightUses(TorchFunctionMode):" in Path(module.__file__).read_text()


def test_same_factor_layout_as_paramwrapper(generated):
    theirs, ours = both(generated[1], init_lora_weights=False)
    assert [t.shape for pair in lora_pairs(theirs, ours) for t in pair] == [(12, 8), (12, 8), (32, 12), (32, 12)]


def test_outputs_equal_paramwrapper_at_init_after_a_step_and_merged(generated):
    inputs = routed_tokens()
    base = Holder()(*inputs)
    theirs, ours = both(generated[1])
    torch.testing.assert_close(ours(*inputs), base)
    torch.testing.assert_close(theirs(*inputs), base)

    theirs, ours = both(generated[1], init_lora_weights=False)
    with torch.no_grad():
        for their_factor, our_factor in lora_pairs(theirs, ours):
            our_factor.copy_(their_factor)
    torch.testing.assert_close(ours(*inputs), theirs(*inputs))
    for model in (theirs, ours):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(*inputs).pow(2).sum().backward()
        optimizer.step()
    for their_factor, our_factor in lora_pairs(theirs, ours):
        torch.testing.assert_close(our_factor, their_factor)
    stepped = ours(*inputs)
    assert not torch.allclose(stepped, base)
    torch.testing.assert_close(stepped, theirs(*inputs))
    for model in (theirs, ours):
        model.merge_adapter()
    merged = [model.base_model.model.experts.get_base_layer().gate_up_proj for model in (ours, theirs)]
    torch.testing.assert_close(*merged)
    torch.testing.assert_close(ours(*inputs), stepped)


def test_dropout_paramwrapper_refuses_works_in_training_only(generated):
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(Holder(), LoraConfig(target_parameters=["gate_up_proj"], r=4, lora_dropout=0.5))
    model = get_peft_model(
        Holder(),
        generated[1].register(LoraConfig(target_modules=["experts"], r=4, lora_dropout=0.5, init_lora_weights=False)),
    )
    inputs = routed_tokens()
    assert not torch.allclose(model(*inputs), model(*inputs))
    model.eval()
    torch.testing.assert_close(model(*inputs), model(*inputs))


def test_flattened_expert_bank_gets_one_pair_per_expert_slice(tmp_path, monkeypatch):
    """DBRX keeps w1 as [experts * ffn_hidden_size, hidden_size] and views it per expert, as the layer does."""
    from test_real_layers import DBRX_EXPERTS, DBRX_TOKENS
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxExperts

    request = Request(
        "transformers.models.dbrx.modeling_dbrx.DbrxExperts",
        init=DBRX_EXPERTS,
        weight="mlp.w1",
        example_input=DBRX_TOKENS,
    )
    outcome = new_plugin(request, tmp_path)
    outcome.apply()
    assert dict(outcome.report.plan.decision.answers)["expert_count_attribute"] == '"num_experts"'
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("lora_dbrx_experts")
    ffn = DbrxConfig(d_model=8, n_heads=2, ffn_config={"ffn_hidden_size": 12, "moe_num_experts": 3}).ffn_config
    holder = nn.ModuleDict({"experts": DbrxExperts(ffn)})
    config = module.register(LoraConfig(target_modules=["experts"], r=2, init_lora_weights=False))
    layer = get_peft_model(holder, config).base_model.model["experts"]
    delta = layer.get_delta_weight("default").view(3, 12, 8)
    weight_A = layer.lora_A["default"].weight.view(3, 2, 8)
    weight_B = layer.lora_B["default"].weight.view(12, 2, 3)
    for expert in range(3):
        expected = weight_B[:, :, expert] @ weight_A[expert] * layer.scaling["default"]
        torch.testing.assert_close(delta[expert], expected)
        assert torch.linalg.matrix_rank(delta[expert]) == 2


ROUTED_ROWS = "(torch.randn(8, 6), torch.randint(0, 3, (8,)))"


@pytest.mark.parametrize(
    "target, attribute, view",
    [("RowBankExperts", "hidden_size", (5, 6)), ("TransposedRowBankExperts", "intermediate_size", (6, 5))],
)
def test_one_expert_a_row_gets_a_pair_in_the_view_its_forward_takes(target, attribute, view, tmp_path, monkeypatch):
    """A row [d1 * d2] is expert e's matrix only as the forward views it: the probe watches the forward for that
    view, and the layer reads d1 or d2 from an attribute, so that it also fits the class built at other sizes."""
    import scaffold_targets

    outcome = new_plugin(Request(f"scaffold_targets.{target}", example_input=ROUTED_ROWS), tmp_path)
    outcome.apply()
    plan = outcome.report.plan
    assert (
        plan.decision.strategy == "experts"
        and f"views as [{view[0]}, {view[1]}] (`{attribute}` = " in plan.decision.reason
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(plan.names.module_name)
    holder = nn.ModuleDict({"experts": getattr(scaffold_targets, target)(num_experts=4, hidden_size=10)})
    config = module.register(LoraConfig(target_modules=["experts"], r=2, init_lora_weights=False))
    model = get_peft_model(holder, config)
    layer = model.base_model.model["experts"]
    rows, columns = (5, 10) if target == "RowBankExperts" else (10, 5)
    delta = layer.get_delta_weight("default").view(4, rows, columns)
    for expert in range(4):
        assert torch.linalg.matrix_rank(delta[expert]) == 2
    x, index = torch.randn(8, 10), torch.arange(8) % 4
    with torch.no_grad():
        adapted = layer(x, index)
        merged = model.merge_and_unload()["experts"](x, index)
    torch.testing.assert_close(merged, adapted)


def test_a_row_view_no_attribute_gives_stays_delta(tmp_path):
    outcome = new_plugin(Request("scaffold_targets.UnsizedRowBankExperts", example_input=ROUTED_ROWS), tmp_path)
    assert outcome.report.plan.decision.strategy == "delta"
