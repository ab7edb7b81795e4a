"""Layers from torch (and look-alikes of others') that real users target: `new`, then the generated suite."""

import pytest
from test_end_to_end import run_suites, strategy_of, suite_counts

from lora_scaffold.cli import main


# Classes built from a config object, as most of transformers' layers are (small sizes, never downloaded).
LLAMA_MLP = "LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2))"
GPT2_MLP = "GPT2MLP(32, GPT2Config(n_embd=16, n_head=2))"
CELL_INPUT = "(torch.randn(2, 6), (torch.randn(2, 8), torch.randn(2, 8)))"
MIXTRAL_EXPERTS = "MixtralExperts(MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=3))"
ROUTED_TOKENS = "(torch.randn(4, 8), torch.randint(0, 3, (4, 2)), torch.rand(4, 2))"
# DBRX keeps its experts flattened along the rows, w1 [experts * ffn_hidden_size, hidden_size].
DBRX_FFN = "{'ffn_hidden_size': 12, 'moe_num_experts': 3, 'moe_top_k': 2}"
DBRX_EXPERTS = f"DbrxExperts(DbrxConfig(d_model=8, n_heads=2, ffn_config={DBRX_FFN}).ffn_config)"
DBRX_TOKENS = "(torch.randn(2, 3, 8), torch.randint(0, 3, (6, 2)), torch.rand(6, 2))"
TARGETS = [
    # (folder, arguments of `new`, strategy, tests skipped on purpose)
    ("mha_in_proj", ["torch.nn.MultiheadAttention", "--weight", "in_proj_weight", "--name", "mha_in"], "delta", 0),
    ("mha_out_proj", ["torch.nn.MultiheadAttention", "--weight", "out_proj.weight", "--name", "mha_out"], "delta", 0),
    (
        "lstm_cell_hh",
        ["torch.nn.LSTMCell", "--arg", "input_size=6", "--arg", "hidden_size=8", "--weight", "weight_hh"]
        + ["--example-input", CELL_INPUT, "--name", "cell_hh"],
        "delta",
        0,
    ),
    (
        "lstm_cell_ih",
        ["torch.nn.LSTMCell", "--arg", "input_size=6", "--arg", "hidden_size=8", "--weight", "weight_ih"]
        + ["--example-input", CELL_INPUT, "--name", "cell_ih"],
        "delta",
        0,
    ),
    (
        "rnn_cell",
        ["torch.nn.RNNCell", "--arg", "input_size=6", "--arg", "hidden_size=8", "--weight", "weight_ih"],
        "delta",
        0,
    ),
    ("spectral", ["scaffold_targets.SpectralLinear"], "delta", 0),
    (
        "llama_mlp",
        ["transformers.models.llama.modeling_llama.LlamaMLP", "--init", LLAMA_MLP, "--weight", "down_proj.weight"],
        "delta",
        0,
    ),
    (
        "gpt2_mlp",
        ["transformers.models.gpt2.modeling_gpt2.GPT2MLP", "--init", GPT2_MLP, "--weight", "c_proj.weight"],
        "delta",
        0,
    ),
    (  # its experts' weights are torch.empty until the model's init: the tests fill them first
        "mixtral_experts",
        ["transformers.models.mixtral.modeling_mixtral.MixtralExperts", "--init", MIXTRAL_EXPERTS]
        + ["--weight", "gate_up_proj", "--example-input", ROUTED_TOKENS],
        "experts",
        0,
    ),
    (
        "dbrx_experts",
        ["transformers.models.dbrx.modeling_dbrx.DbrxExperts", "--init", DBRX_EXPERTS]
        + ["--weight", "mlp.w1", "--example-input", DBRX_TOKENS],
        "experts",
        0,
    ),
    ("empty_init", ["scaffold_targets.EmptyInitExperts", "--example-input", "torch.randn(3, 2, 6)"], "experts", 0),
    (  # one expert a row, [experts, 5 * 6], viewed as [5, 6] by the forward
        "row_bank",
        ["scaffold_targets.RowBankExperts", "--example-input", "(torch.randn(8, 6), torch.randint(0, 3, (8,)))"],
        "experts",
        0,
    ),
    ("no_bf16", ["scaffold_targets.NoBfloat16"], "reuse", 1),
    ("dropout_inside", ["scaffold_targets.DropoutLinear"], "reuse", 0),
    ("weight_norm", ["scaffold_targets.WeightNormLinear"], "delta", 0),
    ("named_config", ["scaffold_targets.Config"], "delta", 0),
    (
        "messy_input",
        ["torch.nn.Linear", "--example-input", "  torch.randn(3, 8)  # three samples", "--name", "messy"],
        "linear",
        0,
    ),
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for folder, arguments, _, _ in TARGETS:
        assert main(["new", *arguments, "-o", str(root / folder)]) == 0, folder
    return root


def test_strategies(generated):
    assert {folder: strategy_of(generated / folder) for folder, *_ in TARGETS} == {f: s for f, _, s, _ in TARGETS}


@pytest.mark.slow  # every real layer's suite (test_strategies stays quick; test_end_to_end runs suites quickly)
def test_generated_suites_pass(generated, tmp_path):
    result = run_suites([generated / folder for folder, *_ in TARGETS], tmp_path / "junit.xml")
    counts = suite_counts(tmp_path / "junit.xml")
    assert result.returncode == 0, result.stdout[-5000:]
    expected_skips = {
        f"test_lora_{arguments[-1]}": skips for _, arguments, _, skips in TARGETS if "--name" in arguments
    }
    for module, outcome in counts.items():
        assert outcome["failed"] == 0 and outcome["passed"] >= 17, (module, outcome)
        assert outcome["skipped"] == expected_skips.get(module, outcome["skipped"]), (module, outcome)
    assert counts["test_lora_no_bfloat16"]["skipped"] == 1
    assert counts["test_lora_spectral_linear"]["skipped"] == 0


def test_config_built_targets_are_built_the_same_way_in_the_tests(generated):
    tests = (generated / "llama_mlp" / "test_lora_llama_mlp.py").read_text()
    assert "from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP" in tests
    assert f"    return {LLAMA_MLP}\n" in tests


def test_spectral_norm_is_compared_in_eval_mode(generated):
    assert (
        "Outputs are compared in eval mode: its forward changes the module's state"
        in (generated / "spectral" / "test_lora_spectral_linear.py").read_text()
    )


def test_weight_norm_adapts_the_weight_it_computes_and_merges_through_it(generated):
    """`weight` under weight_norm is what the user means; merging sets g and v through the parametrization."""
    import importlib
    import sys

    import torch
    from peft import LoraConfig, get_peft_model
    from scaffold_targets import WeightNormLinear
    from torch import nn

    sys.path.insert(0, str(generated / "weight_norm"))
    try:
        module = importlib.import_module("lora_weight_norm_linear")
    finally:
        sys.path.pop(0)
    assert module.WEIGHT_NAME == "weight"
    holder = nn.ModuleDict({"projection": WeightNormLinear()})
    holder.forward = lambda x: holder["projection"](x)
    config = module.register(LoraConfig(target_modules=["projection"], r=4, init_lora_weights=False))
    model = get_peft_model(holder, config)
    layer = model.base_model.model["projection"]
    base = layer.get_base_layer()
    expected = base.weight.detach() + layer.get_delta_weight("default")
    x = torch.randn(3, 5)
    unmerged = model(x)
    model.merge_adapter()
    torch.testing.assert_close(base.weight, expected)  # g and v now compute W + dW
    assert base.parametrizations.weight.original1.requires_grad is False
    torch.testing.assert_close(model(x), unmerged)
