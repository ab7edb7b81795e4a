"""`audit`: every adapter of a model checked in the model (live, trained, merged) and the weight coverage."""

import json

from test_scan import QWEN2_MOE

from lora_scaffold.cli import main


ENCODER = (
    "torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 1, "
    "enable_nested_tensor=False)"
)


def audited(capsys, *arguments: str) -> tuple[int, dict]:
    code = main(["audit", *arguments, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_adapters_a_fused_path_skips_are_dead(capsys):
    """nn.TransformerEncoderLayer's eval fast path reads its modules' base weights: PEFT's adapters there do
    nothing without autograd, and merging one changes the output."""
    code, report = audited(capsys, ENCODER, "--model-input", "torch.randn(2, 5, 16)")
    modules = {m["name"]: m for m in report["modules"]}
    assert code == 1 and not report["passed"]
    assert not modules["layers.0.self_attn"]["live"] and not modules["layers.0.linear1"]["live"]
    assert not modules["layers.0.linear1"]["merges"]
    assert all(m["gradients"] for m in modules.values())  # training takes the unfused path
    assert report["coverage"] == {"weight_elements": 2048, "peft": 2048, "generated": 0}


def test_a_moe_model_with_its_generated_layers_is_live_everywhere(capsys, tmp_path):
    layers = tmp_path / "layers"
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(layers)]) == 0
    capsys.readouterr()
    code, alone = audited(capsys, QWEN2_MOE)
    assert code == 0 and {m["cls"] for m in alone["modules"]} == {"Linear", "Embedding"}
    code, report = audited(capsys, QWEN2_MOE, "--layers", str(layers))
    generated = {m["cls"]: m for m in report["modules"] if m["generated"]}
    assert code == 0 and set(generated) == {"Qwen2MoeExperts", "Qwen2MoeTopKRouter"}
    assert all(m["live"] and m["gradients"] and m["merges"] for m in report["modules"])
    coverage = report["coverage"]
    # PEFT alone: attention, shared expert, embeddings, head; the layers add the router and gate_up_proj (4x16x16).
    assert coverage["generated"] == 4 * 16 + 4 * 16 * 16 and coverage["peft"] == alone["coverage"]["peft"]
    assert main(["audit", QWEN2_MOE, "--layers", str(layers)]) == 0
    assert "with the generated layers" in capsys.readouterr().out


def test_a_folder_without_layers_is_one_line(capsys, tmp_path):
    assert main(["audit", QWEN2_MOE, "--layers", str(tmp_path)]) == 2
    assert "no generated layer there" in capsys.readouterr().err
