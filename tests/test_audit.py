"""`audit`: every adapter of a model checked in the model (live, trained, merged) and the weight coverage."""

import json

import torch
from test_end_to_end import run_suites
from test_scan import QWEN2_MOE, TESTS

from lora_scaffold.capture import evaluate_model, left_empty
from lora_scaffold.cli import main
from lora_scaffold.scan import model_expression


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
    generated = {m["name"]: m["layer"] for m in report["modules"] if m["generated"]}
    # The bank's two layers are stacked on it, each named by the weight it adapts.
    assert code == 0 and generated == {
        "model.layers.0.mlp.gate": "LoraQwen2MoeTopKRouter",
        "model.layers.0.mlp.experts.gate_up_proj": "LoraQwen2MoeExperts",
        "model.layers.0.mlp.experts.down_proj": "LoraQwen2MoeExpertsDownProj",
    }
    assert all(m["live"] and m["gradients"] and m["merges"] for m in report["modules"])
    coverage = report["coverage"]
    # PEFT alone: attention, shared expert, embeddings, head; the layers add the router (4x16), gate_up_proj
    # (4x16x16) and down_proj (4x16x8): every weight of the model.
    assert coverage["generated"] == 4 * 16 + 4 * 16 * 16 + 4 * 16 * 8 and coverage["peft"] == alone["coverage"]["peft"]
    assert coverage["peft"] + coverage["generated"] == coverage["weight_elements"]
    assert main(["audit", QWEN2_MOE, "--layers", str(layers)]) == 0
    assert "with the generated layers" in capsys.readouterr().out


def test_packages_of_one_name_in_two_folders_are_each_their_own(tmp_path):
    """One process loads two `layers` packages: the second's layers are its own, not the first's of that name."""
    import inspect
    import sys
    from pathlib import Path

    from lora_scaffold.audit import load_layers

    first, second = tmp_path / "a" / "layers", tmp_path / "b" / "layers"
    for folder in (first, second):
        assert main(["scan", QWEN2_MOE, "--generate", "-o", str(folder), "--json"]) == 0
    for folder in (first, second):
        load_layers(folder)
        stacked = [cls for layers in sys.modules["layers"].STACKED.values() for cls in layers]
        assert stacked and all(Path(inspect.getfile(cls)).parent == folder for cls in stacked)


def test_a_package_that_does_not_import_is_one_line(capsys, tmp_path):
    layers = tmp_path / "layers"
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(layers)]) == 0
    (layers / "__init__.py").write_text("raise RuntimeError('edited into a corner')\n")
    capsys.readouterr()
    assert main(["audit", QWEN2_MOE, "--layers", str(layers)]) == 2
    error = capsys.readouterr().err
    assert "__init__.py failed: RuntimeError: edited into a corner" in error and len(error.splitlines()) == 1


def test_two_layers_of_one_class_outside_a_package_are_one_line(capsys, tmp_path):
    """`new -o` twice into one folder, for two weights of the expert bank: each layer's own register would leave
    one of them out; a package of scan --generate stacks them."""
    layers = tmp_path / "layers"
    for weight in ("gate_up_proj", "down_proj"):
        name = ["--name", "experts_down"] if weight == "down_proj" else []
        arguments = ["--from-model", QWEN2_MOE, "--module", "model.layers.0.mlp.experts", "--weight", weight, *name]
        assert main(["new", *arguments, "-o", str(layers)]) == 0
    assert "holds lora_qwen2_moe_experts for Qwen2MoeExperts too" in capsys.readouterr().out  # said by the second
    assert main(["audit", QWEN2_MOE, "--layers", str(layers)]) == 2
    error = capsys.readouterr().err
    assert "two layers adapt Qwen2MoeExperts" in error and "scan --generate" in error and len(error.splitlines()) == 1


def test_a_folder_without_layers_is_one_line(capsys, tmp_path):
    assert main(["audit", QWEN2_MOE, "--layers", str(tmp_path)]) == 2
    assert "no generated layer there" in capsys.readouterr().err


def test_a_generated_layer_inside_another_generated_layer_is_live(capsys, tmp_path):
    """An expert bank holding its own norm (transformers' ErgoExperts): PEFT wraps the bank, then looks the norm up
    through the bank's layer; the norm's layer must land inside the bank's base module, where the forward calls it."""
    model, layers = f"{TESTS / 'scan_models.py'}:nested_model", tmp_path / "layers"
    assert main(["scan", model, "--model-input", "torch.randn(5, 6)", "--generate", "-o", str(layers)]) == 0
    capsys.readouterr()
    code, report = audited(capsys, model, "--model-input", "torch.randn(5, 6)", "--layers", str(layers))
    generated = {m["name"]: m for m in report["modules"] if m["generated"]}
    assert set(generated) == {"1", "1.norm"}, report
    assert code == 0 and all(m["live"] and m["gradients"] and m["merges"] for m in report["modules"]), report


def test_a_weight_its_module_is_handed_is_adapted_through_the_parent_that_reads_it(capsys, tmp_path):
    """DBRX's experts read their `mlp`'s weights and pass them to its forward: the layer wraps the parent."""
    model, layers = f"{TESTS / 'scan_models.py'}:passed_weight_model", tmp_path / "layers"
    assert main(["scan", model, "--model-input", "torch.randn(5, 6)", "--generate", "-o", str(layers), "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)["layers"]
    assert [(g["class"], g["module"], g["weight"]) for g in generated if g["layer"]] == [
        ("scan_models.ReadsChildWeight", "1", "mlp.weight")
    ]
    code, report = audited(capsys, model, "--model-input", "torch.randn(5, 6)", "--layers", str(layers))
    assert code == 0 and [m["name"] for m in report["modules"] if m["generated"]] == ["1"], report


def test_a_class_whose_first_instance_is_never_called_gets_its_layer_from_one_that_is(capsys, tmp_path):
    model, layers = f"{TESTS / 'scan_models.py'}:shared_table_model", tmp_path / "layers"
    feed = ["--model-input", "torch.randint(0, 16, (2, 5))"]
    assert main(["scan", model, *feed, "--generate", "-o", str(layers), "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)["layers"]
    assert [(g["module"], bool(g["layer"])) for g in generated] == [("embed_tokens", True)], generated
    code, report = audited(capsys, model, *feed, "--layers", str(layers))
    modules = {m["name"]: m for m in report["modules"]}
    assert code == 0 and not modules["shared"]["reached"] and modules["embed_tokens"]["live"], report
    assert main(["audit", model, *feed, "--layers", str(layers)]) == 0
    assert "unproven  shared: the model's forward on this input never calls them, or only on empty inputs" in (
        capsys.readouterr().out
    )


def test_what_a_model_leaves_empty_is_filled_alike_by_the_tool_and_the_tests(capsys, tmp_path):
    """A model whose init leaves a bank `torch.empty` (Qwen3-Omni's talker): garbage, NaN by chance, upstream of
    another layer. The tool and the generated tests draw it alike, so the recorded call is the probed one."""
    model, layers = f"{TESTS / 'scan_models.py'}:unfilled_model", tmp_path / "layers"
    expression = model_expression(model)
    bank = evaluate_model(expression).get_parameter("0.bank").detach()
    assert left_empty(expression) == ("0.bank",) and 0.01 < float(bank.std()) < 0.03
    assert torch.equal(bank, evaluate_model(expression).get_parameter("0.bank"))
    assert main(["scan", model, "--model-input", "torch.randn(5, 8)", "--generate", "-o", str(layers)]) == 0
    capsys.readouterr()
    suite = (layers / "test_lora_experts_with_norm.py").read_text()
    assert 'for name in ["0.bank"]:' in suite
    assert run_suites([layers], tmp_path / "suites.xml", extra_paths=(TESTS,)).returncode == 0
    code, report = audited(capsys, model, "--model-input", "torch.randn(5, 8)", "--layers", str(layers))
    assert code == 0 and all(m["live"] and m["gradients"] and m["merges"] for m in report["modules"]), report


def test_a_weight_the_model_reads_without_calling_its_module_is_adapted_through_the_parent(capsys, tmp_path):
    """PEFT's lora.Linear on LongCat's router.classifier is dead (the router applies classifier.weight itself): scan
    says so and gives the router a command for that weight; with its layer, the audit finds every adapter live."""
    model, layers = f"{TESTS / 'scan_models.py'}:direct_read_model", tmp_path / "layers"
    arguments = ["scan", model, "--model-input", "torch.randn(5, 6)", "--json"]
    assert main(arguments) == 0
    classes = {c["qualified_name"]: c for c in json.loads(capsys.readouterr().out)["classes"]}
    assert "dead at 1.classifier" in classes["torch.nn.modules.linear.Linear"]["handled_by"]
    router = classes["scan_models.ReadsLinearWeight"]
    assert (router["module"], router["weight"]) == ("1", "classifier.weight")
    assert main([*arguments[:-1], "--generate", "-o", str(layers)]) == 0
    capsys.readouterr()
    code, report = audited(capsys, model, "--model-input", "torch.randn(5, 6)", "--layers", str(layers))
    names = {m["name"]: m for m in report["modules"]}
    assert code == 0 and names["1"]["generated"] and "1.classifier" not in names, report


def test_a_quantized_base_s_layer_refuses_to_merge_as_promised_and_its_input_gradient_is_reported(capsys, tmp_path):
    """BitNet's BitLinear: requantizing W + dW would lose more of the audit's dW than the layer's tolerance, so it
    refuses to merge, which passes; the gradient it passes to its input is its straight-through estimate, which the
    audit says."""
    layers = tmp_path / "layers"
    init = "quantized_layers.bit_linear()"
    assert main(["new", "transformers.integrations.bitnet.BitLinear", "--init", init, "-o", str(layers)]) == 0
    capsys.readouterr()
    model = f"torch.nn.Sequential({init}, torch.nn.Linear(8, 8))"
    code, report = audited(capsys, model, "--layers", str(layers), "--model-input", "torch.randn(2, 16)")
    modules = {m["name"]: m for m in report["modules"]}
    assert code == 0 and report["passed"], report
    assert modules["0"]["generated"] and modules["0"]["quantized_merge"] == "refused" and modules["0"]["live"]
    assert "is not its map's (cosine" in modules["0"]["input_gradient"]
    assert modules["1"]["merges"] and not modules["1"]["quantized_merge"] and modules["1"]["input_gradient"] == ""
    assert main(["audit", model, "--layers", str(layers), "--model-input", "torch.randn(2, 16)"]) == 0
    text = capsys.readouterr().out
    assert "refused (quantized base)" in text and "gradient  0: the gradient it passes to its input" in text


def test_an_input_the_plain_model_fails_on_is_said_to_be_the_input(capsys):
    """Before any adapter: LXMERT's forward needs `visual_feats`, which nothing in its config makes; a wrong
    --model-input likewise. Neither is reported as the adapted model's failure."""
    lxmert = (
        "transformers.AutoModel.from_config(transformers.LxmertConfig(hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2, vocab_size=64, max_position_embeddings=64))"
    )
    for arguments, given in (
        ([lxmert], "{'input_ids': torch.randint(0, 64, (2, 8))}"),
        ([ENCODER, "--model-input", "torch.randn(2, 5, 7)"], "torch.randn(2, 5, 7)"),
    ):
        assert main(["audit", *arguments]) == 2
        error = capsys.readouterr().err
        assert f"the model's forward fails on its input {given}: " in error and "adapted" not in error, error
        assert error.count("\n") == 1 and "pass --model-input EXPR" in error


def test_a_model_failing_only_once_adapted_is_said_to_fail_through_its_lora_layers(capsys):
    model = f"{TESTS / 'scan_models.py'}:stride_reading_model"
    assert main(["audit", model, "--model-input", "torch.randn(2, 2, 8)"]) == 2
    error = capsys.readouterr().err
    assert (
        "the adapted model's forward in eval mode failed: the model reads `stride` of a Conv1d, which PEFT's "
        "lora.Conv1d wrapping it does not pass on (the plain model runs on this input): leave such modules out of "
        "target_modules" in error
    ), error
    assert error.count("\n") == 1


def test_a_merge_refused_in_words_leaves_the_model_as_it_was_and_passes(capsys):
    """PEFT's lora.Conv2d refuses to merge into a grouped convolution (NotImplementedError, Nystromformer's
    depthwise conv): nothing is merged wrongly, so the audit passes and says why it did not merge."""
    grouped = ["torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))", "--model-input", "torch.randn(2, 4, 8, 8)"]
    code, report = audited(capsys, *grouped)
    (conv,) = report["modules"]
    assert code == 0 and conv["live"] and conv["gradients"] and "groups > 1" in conv["merge_refused"], report
    assert main(["audit", *grouped]) == 0
    assert "refused: Merging is not supported for _ConvNd layers with groups > 1!" in capsys.readouterr().out


def test_an_adapter_whose_effect_is_below_float_resolution_at_init_is_live_not_dead(capsys):
    """Dead means the output never moves: a small change of a faint branch's adapter leaves float32 outputs equal,
    a large one does not (the audit called Qwen3.5-MoE's `in_proj_a` dead with two linear-attention heads)."""
    code, report = audited(capsys, f"{TESTS / 'scan_models.py'}:faint_model", "--model-input", "torch.randn(2, 4)")
    assert code == 0 and {m["name"]: m["live"] for m in report["modules"]} == {"0.proj": True}


def test_the_out_proj_of_peft_s_multihead_attention_is_merged_with_its_attention(capsys):
    """PEFT's lora.MultiheadAttention merges the lora.Linear on its out_proj itself (SigLIP's pooling head, in the
    sweep): merged alone, that adapter is merged again by the attention's forward, and the audit failed it."""
    model = f"{TESTS / 'scan_models.py'}:attention_pool_model"
    code, report = audited(capsys, model, "--model-input", "torch.randn(2, 5, 6)")
    modules = {m["name"]: m for m in report["modules"]}
    assert code == 0 and modules["1.attention.out_proj"]["merges"] and modules["1.attention"]["merges"]


def test_a_module_called_only_on_an_empty_batch_is_not_reached_rather_than_dead(capsys):
    """Higgs Audio's audio_mlp runs on the audio tokens of the input, of which a text input has none: that proves
    nothing either way (the sweep called it dead)."""
    code, report = audited(
        capsys, f"{TESTS / 'scan_models.py'}:token_type_model", "--model-input", "torch.randn(3, 4)"
    )
    modules = {m["name"]: m for m in report["modules"]}
    assert code == 0 and modules["0.text"]["reached"] and modules["0.text"]["live"]
    assert not modules["0.audio"]["reached"] and modules["0.audio"]["passed"]
