"""`scan` a model, then run the commands it prints: from a model to working layers (issue 19's reproductions)."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from test_end_to_end import run_suites

from lora_scaffold.capture import check_runs, default_model_input, evaluate_model, recorded_call
from lora_scaffold.cli import main
from lora_scaffold.constructor import ctor_params
from lora_scaffold.request import ModelCall, Request
from lora_scaffold.workflow import plan_layer, request_from_model


TESTS = Path(__file__).resolve().parent
LAYERS = "hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2"
MIXTRAL = (
    f"transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig({LAYERS}, num_local_experts=4, "
    "vocab_size=64))"
)
QWEN2_MOE = (
    f"transformers.AutoModelForCausalLM.from_config(transformers.Qwen2MoeConfig({LAYERS}, moe_intermediate_size=8, "
    "shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, vocab_size=64))"
)
MAMBA = (
    "transformers.AutoModelForCausalLM.from_config(transformers.MambaConfig(hidden_size=16, state_size=4, "
    "num_hidden_layers=1, vocab_size=64, expand=2, conv_kernel=3, time_step_rank=4))"
)
OPT = (
    "transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(hidden_size=16, ffn_dim=32, "
    "num_hidden_layers=1, num_attention_heads=2, vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=16))"
)
WAV2VEC2 = (
    "transformers.AutoModel.from_config(transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, "
    "num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), "
    "num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=32))"
)
SWIN = (
    "transformers.AutoModelForImageClassification.from_config(transformers.SwinConfig(image_size=32, patch_size=4, "
    "embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, num_labels=3))"
)


def scanned(capsys, model: str, *options: str) -> dict[str, dict]:
    assert main(["scan", model, "--json", *options]) == 0
    return {c["qualified_name"]: c for c in json.loads(capsys.readouterr().out)["classes"]}


def run_command(command: str, folder: Path) -> None:
    """A command as scan prints it, writing into `folder`, and the generated suite run in a fresh pytest."""
    words = shlex.split(command)[1:]
    words[words.index("-o") + 1] = str(folder)
    assert main(words) == 0
    result = run_suites([folder], folder.parent / f"{folder.name}.xml", extra_paths=(TESTS,))
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow  # every command scan prints and each suite (the quick run keeps one suite per model shape)
def test_a_model_without_a_config_needs_its_input_and_then_every_command_works(capsys, tmp_path):
    model = f"{TESTS / 'scan_models.py'}:small_model"
    classes = scanned(capsys, model)
    assert (
        "has no transformers config to make its input from: scan with --model-input"
        in (classes["scaffold_targets.PlainLinear"]["why_not"])
    )
    classes = scanned(capsys, model, "--model-input", "torch.randn(2, 3, 6, 6)")
    assert classes["torch.nn.modules.linear.Linear"]["handled_by"] == "lora.Linear"
    assert "nothing for LoRA" in classes["torch.nn.modules.normalization.LayerNorm"]["why_not"]
    squared, plain = classes["scaffold_targets.SquaredConv"], classes["scaffold_targets.PlainLinear"]
    assert squared["handled_by"] == "lora.Conv2d, as for its base class"
    assert "--from-model" in plain["command"] and "--module 2 --weight weight" in plain["command"]
    run_command(plain["command"], tmp_path / "plain")
    run_command(squared["command"], tmp_path / "squared")


def test_moe_experts_get_a_command_with_the_input_the_model_feeds(capsys, tmp_path):
    """Reproduction 1: scan said "build it with --init EXPR"; the guessed input passed floats as top_k_index."""
    classes = scanned(capsys, QWEN2_MOE)
    experts = classes["transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts"]
    assert experts["weights"]["gate_up_proj"] == [4, 16, 16]  # PEFT 0.22 wraps it too, for target_parameters only
    assert "--module model.layers.0.mlp.experts --weight gate_up_proj" in experts["command"]
    # The bank's other weight is said to be left, in one line, with the command's way to take it instead.
    assert experts["unadapted"] == ["down_proj"]
    request = request_from_model(QWEN2_MOE, "model.layers.0.mlp.experts", None, weight="gate_up_proj")
    _, plan = plan_layer(request)
    hidden, top_k_index, top_k_weights = plan.call.example_call()[0]
    assert hidden.shape == (16, 16) and top_k_index.dtype.is_floating_point is False and top_k_index.max() < 4
    assert top_k_weights.shape == (16, 2) and plan.decision.strategy == "experts"
    run_command(experts["command"], tmp_path / "experts")


GRANITE_MOE = (
    f"transformers.AutoModelForCausalLM.from_config(transformers.GraniteMoeConfig({LAYERS}, num_local_experts=4, "
    "num_experts_per_tok=2, vocab_size=64))"
)


def peft_wraps(model: str, target: str) -> bool:
    """What PEFT itself does with a config naming `target` in this model: whether it builds a ParamWrapper."""
    import transformers
    from peft import LoraConfig, get_peft_model

    built = eval(model, {"transformers": transformers})  # noqa: S307 - the test's own expression
    try:
        adapted = get_peft_model(built, LoraConfig(target_modules=[target], r=2))
    except ValueError as exc:  # "Target module ... is not supported"
        assert "not supported" in str(exc), exc
        return False
    return any(type(module).__name__ == "ParamWrapper" for module in adapted.modules())


def test_routers_peft_converts_are_reported_as_peft_handles_them(capsys):
    """Reproduction 6: PEFT turns a config naming Mixtral's `gate` into a ParamWrapper on `gate.weight` (0.21 and
    on; 0.22 does it for Qwen2-MoE too): scan says what PEFT does, which get_peft_model shows here."""
    routers = []
    for model in (MIXTRAL, QWEN2_MOE, GRANITE_MOE):
        router = next(c for name, c in scanned(capsys, model).items() if name.endswith("TopKRouter"))
        leaf = router["module"].rpartition(".")[2]
        converted = peft_wraps(model, leaf)
        said = f"lora.ParamWrapper on {leaf}.weight (PEFT's transformers-v5 MoE conversion of '{leaf}')"
        assert router["handled_by"] == (said if converted else ""), (model, router["handled_by"])
        routers.append(converted)
    # Both answers are checked: update the models if a PEFT converts all three.
    assert routers[0] and not routers[2], routers


def test_a_wrapped_init_is_read_through_its_decorator(capsys, tmp_path):
    """Reproduction 2: transformers wraps MambaMixer.__init__ in a decorator taking (*args, **kwargs)."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    assert [p.name for p in ctor_params(MambaMixer)][:2] == ["config", "layer_idx"]
    mixer = scanned(capsys, MAMBA)["transformers.models.mamba.modeling_mamba.MambaMixer"]
    assert "--module backbone.layers.0.mixer --weight A_log" in mixer["command"]
    run_command(mixer["command"], tmp_path / "mixer")


def test_a_position_embedding_is_taken_from_the_model_not_rebuilt_from_its_attributes(capsys, tmp_path):
    """Reproduction 3: OPT's table has num_embeddings + 2 rows, and its input is the attention mask."""
    embedding = scanned(capsys, OPT)["transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding"]
    assert embedding["weights"]["weight"] == [34, 16] and "--from-model" in embedding["command"]
    request = request_from_model(OPT, "model.decoder.embed_positions", None, weight="weight")
    _, plan = plan_layer(request)
    mask = plan.call.example_call()[0][0]
    assert mask.shape == (2, 8) and set(mask.unique().tolist()) == {1}  # the mask the model makes for its ids
    run_command(embedding["command"], tmp_path / "positions")


def test_a_weight_normed_conv_is_listed_as_its_weight_and_targeted_through_its_parent(capsys, tmp_path):
    """Reproduction 4: wav2vec2's pos_conv_embed.conv, whose class torch generates (ParametrizedConv1d)."""
    classes = scanned(capsys, WAV2VEC2)
    conv = classes["torch.nn.modules.conv.Conv1d (parametrized)"]
    assert conv["weights"] == {"bias": [16], "weight": [16, 8, 4]} and conv["example"] == "encoder.pos_conv_embed.conv"
    assert "whose merge is lost" in conv["handled_by"]
    assert "--module encoder.pos_conv_embed --weight conv.weight" in conv["command"]
    assert not any("Parametrization" in name for name in classes)
    assert main(["new", "--from-model", WAV2VEC2, "--module", "encoder.pos_conv_embed.conv"]) == 2
    assert "target its parent, --module encoder.pos_conv_embed --weight conv.weight" in capsys.readouterr().err
    run_command(conv["command"], tmp_path / "pos_conv")


def test_instances_of_other_shapes_are_listed_and_checked(capsys, tmp_path):
    """Reproduction 5: Swin's relative position bias has one table column per head, per stage."""
    bias = scanned(capsys, SWIN)["transformers.models.swin.modeling_swin.SwinRelativePositionBias"]
    tables = [variant["weights"]["relative_position_bias_table"] for variant in bias["variants"]]
    assert tables == [[9, 1], [9, 2]] and bias["instances"] == 2
    # The command targets the stage whose table LoRA can adapt; `new` checks the layer on the other stage too.
    assert "--module swin.encoder.layers.1.blocks.0.attention.relative_position_bias" in bias["command"]
    run_command(bias["command"], tmp_path / "bias")


def test_outputs_of_mixed_dtypes_keep_each_its_dtype_in_bf16(tmp_path):
    """Reproduction 7: a router's bf16 logits, float32 scores and int64 indices (the old check compared their
    concatenation, promoted to float32, with bfloat16)."""
    model = f"{TESTS / 'scan_models.py'}:routed_model"
    run_command(f"x new --from-model {model} --module 1 --model-input 'torch.randn(3, 6)' -o out", tmp_path / "router")


def test_an_inferred_input_is_one_the_output_depends_on(tmp_path):
    """Reproduction 7, second half: a relu that zeroes every output on the first guess would hide every adapter."""
    command = "x new scaffold_targets.ReluPair --weight lin.weight -o out"
    run_command(command, tmp_path / "relu")
    plan = plan_layer(Request("scaffold_targets.ReluPair", weight="lin.weight"))[1]
    assert plan.call.example_input == "torch.randn(2, 3, 8)"


def test_a_model_that_does_not_build_on_the_meta_device_is_built_for_real(capsys, tmp_path):
    """Reproduction 8: a layer that quantizes in its constructor (`.item()` of its scale) cannot be built on meta."""
    model = f"{TESTS / 'scan_models.py'}:quantized_model"
    quantized = scanned(capsys, model, "--model-input", "torch.randn(3, 6)")["scan_models.Int8Linear"]
    # Its int8 buffer is listed too, and the command adapts the float weight, as `new` would choose.
    assert (
        quantized["weights"] == {"up": [5, 5], "qweight": [5, 8]} and quantized["storage"] == "qweight stored as int8"
    )
    assert "--weight up" in quantized["command"]
    run_command(quantized["command"], tmp_path / "int8")


def test_scan_generate_writes_every_layer_and_one_register(capsys, tmp_path):
    out = tmp_path / "layers"
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["layers"]
    layers = {(layer["class"].rpartition(".")[2], layer["weight"]): layer for layer in found}
    assert {key: layer["strategy"] for key, layer in layers.items()} == {
        ("Qwen2MoeTopKRouter", "weight"): "delta",
        ("Qwen2MoeExperts", "gate_up_proj"): "experts",
        ("Qwen2MoeExperts", "down_proj"): "experts",  # a layer a weight: the expert bank is adapted whole
    }
    assert all(layer["unadapted"] == [] for layer in found)
    assert layers[("Qwen2MoeExperts", "down_proj")]["layer"] == "lora_qwen2_moe_experts_down_proj"
    assert sorted(p.name for p in out.glob("*.py")) == [
        "__init__.py",
        "conftest.py",
        "lora_qwen2_moe_experts.py",
        "lora_qwen2_moe_experts_down_proj.py",
        "lora_qwen2_moe_top_k_router.py",
        "test_lora_qwen2_moe_experts.py",
        "test_lora_qwen2_moe_experts_down_proj.py",
        "test_lora_qwen2_moe_top_k_router.py",
    ]
    result = run_suites([out], tmp_path / "junit.xml", extra_paths=(tmp_path,))
    assert result.returncode == 0 and "81 passed" in result.stdout, result.stdout[-3000:]
    # Again: nothing changes; an edited __init__.py is not overwritten.
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(out)]) == 0
    again = capsys.readouterr().out
    assert "identical" in again and "leaves" not in again
    assert "lora_qwen2_moe_experts_down_proj.LoraQwen2MoeExpertsDownProj: experts  <- " in again
    (out / "__init__.py").write_text("# mine\n")
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(out)]) == 2
    assert "__init__.py already exists with other content" in capsys.readouterr().err
    assert (out / "__init__.py").read_text() == "# mine\n"


def test_the_package_registers_every_layer_and_stacks_a_class_with_several(tmp_path, import_path):
    """An expert bank gets a layer for gate_up_proj and one for down_proj; the package stacks them on each bank:
    both adapters train, merge_and_unload merges both, and a saved adapter loads back into both."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    out = tmp_path / "moe_layers"
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(out)]) == 0
    import_path(tmp_path)
    import moe_layers

    config = moe_layers.register(LoraConfig(target_modules=["gate", "experts"]))
    assert sorted(cls.__name__ for cls in config._custom_modules) == ["Qwen2MoeExperts", "Qwen2MoeTopKRouter"]

    def build():
        torch.manual_seed(0)
        return eval(QWEN2_MOE, {"transformers": transformers}).eval()  # noqa: S307 - the test's own expression

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    plain = build()(input_ids=ids).logits
    config = moe_layers.register(LoraConfig(target_modules=["experts"], init_lora_weights=False))
    model = get_peft_model(build(), config).eval()
    outer = model.get_submodule("base_model.model.model.layers.0.mlp.experts")
    assert [type(outer).__name__, type(outer.base_layer).__name__] == [
        "LoraQwen2MoeExpertsDownProj",
        "LoraQwen2MoeExperts",
    ]
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2
    model.eval().save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        build(), tmp_path / "adapter", config=moe_layers.register(LoraConfig.from_pretrained(tmp_path / "adapter"))
    ).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, adapted)
    merged = loaded.merge_and_unload()
    assert type(merged.get_submodule("model.layers.0.mlp.experts")).__name__ == "Qwen2MoeExperts"
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_where_the_weight_scan_names_gets_no_layer_the_next_weight_does(capsys, tmp_path):
    """SpareBank's larger weight, which scan names, is never read: that weight's line says so, and the weight the
    forward reads gets the class's layer."""
    model = f"{TESTS / 'scan_models.py'}:spare_bank_model"
    out = tmp_path / "layers"
    assert main(["scan", model, "--model-input", "torch.randn(5, 6)", "--generate", "-o", str(out), "--json"]) == 0
    found = {layer["weight"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert found["spare"]["layer"] is None and "does not change with 'spare'" in found["spare"]["error"]
    assert found["used"]["layer"] == "lora_spare_bank" and (out / "lora_spare_bank.py").is_file()


def test_a_target_called_with_a_plain_int_first_gets_a_green_suite(capsys, tmp_path):
    """SAM3-Lite's text position embedding takes the sequence length: the suite's mixed-batch check took the length
    of that int (TypeError) and was red on a valid layer."""
    model = f"{TESTS / 'scan_models.py'}:length_table_model"
    out = tmp_path / "length_layers"
    assert main(["scan", model, "--model-input", "torch.randn(2, 5, 6)", "--generate", "-o", str(out)]) == 0
    assert "lora_length_table.LoraLengthTable: delta" in capsys.readouterr().out
    result = run_suites([out], tmp_path / "junit.xml", extra_paths=(tmp_path, TESTS))
    assert result.returncode == 0 and " failed" not in result.stdout, result.stdout[-3000:]


def test_a_layer_for_another_weight_that_cannot_stack_is_one_line(capsys, tmp_path, monkeypatch):
    """Stacked layers each run the module with their weight's W + dW; a strategy whose layer does not (one adding
    its own term to the output) cannot go on top of another: that weight gets no layer, and says why."""
    from lora_scaffold.strategies.experts import EXPERTS

    monkeypatch.setattr(EXPERTS, "stacks", False)
    out = tmp_path / "layers"
    assert main(["scan", QWEN2_MOE, "--generate", "-o", str(out), "--json"]) == 0
    found = {
        (layer["class"].rpartition(".")[2], layer["weight"]): layer
        for layer in json.loads(capsys.readouterr().out)["layers"]
    }
    assert found[("Qwen2MoeExperts", "gate_up_proj")]["layer"] == "lora_qwen2_moe_experts"
    down = found[("Qwen2MoeExperts", "down_proj")]
    assert down["layer"] is None and down["error"] == (
        "its layer (experts) cannot stack on the layer for gate_up_proj: only a layer running the module with W + dW does"
    )
    assert (
        not (out / "lora_qwen2_moe_experts_down_proj.py").exists()
        and "STACKED" not in (out / "__init__.py").read_text()
    )


DEEPSEEK_V3 = (
    f"transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config({LAYERS}, vocab_size=64, "
    "moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, "
    "kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1))"
)


def test_registered_layers_leave_peft_its_parameter_wrappers(capsys, tmp_path, import_path):
    """PEFT converts a DeepSeek-V3 config naming the shared experts' gate_proj, up_proj and down_proj into the routed
    experts' fused parameters (ParamWrapper): scan says so, and with the generated layers registered PEFT still
    builds its wrappers there (the experts layer took gate_up_proj, then PEFT refused down_proj, before)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    experts = scanned(capsys, DEEPSEEK_V3)["transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts"]
    assert experts["handled_by"] == (
        "lora.ParamWrapper on experts.gate_up_proj, experts.down_proj (PEFT's transformers-v5 MoE conversion of "
        "'down_proj', 'gate_proj', 'up_proj')"
    )
    assert main(["scan", DEEPSEEK_V3, "--generate", "-o", str(tmp_path / "deepseek_layers")]) == 0
    import_path(tmp_path)
    import deepseek_layers

    def experts_layer(targets: list[str]):
        model = eval(DEEPSEEK_V3, {"transformers": transformers})  # noqa: S307 - the test's own expression
        adapted = get_peft_model(model, deepseek_layers.register(LoraConfig(target_modules=targets, r=2)))
        adapted(input_ids=torch.randint(0, 64, (1, 8)))
        return type(adapted.get_submodule("base_model.model.model.layers.0.mlp.experts")).__name__

    assert experts_layer(["gate_proj", "up_proj", "down_proj"]) == "ParamWrapper"
    assert experts_layer(["q_a_proj", "experts"]) == "LoraDeepseekV3ExpertsDownProj"  # stacked on gate_up_proj's


def test_a_model_that_cannot_be_built_is_one_line(capsys):
    assert main(["scan", "transformers.GPT2Config()"]) == 2
    assert "gives a GPT2Config, not an nn.Module" in capsys.readouterr().err
    assert main(["scan", "nosuchpkg_xyz.build()"]) == 2
    assert "building the model" in capsys.readouterr().err


def test_new_from_a_model_targets_the_class_of_a_submodule_and_its_suite_passes(tmp_path):
    model = (
        "transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, "
        "vocab_size=64))"
    )
    arguments = ["--from-model", model, "--module", "transformer.h.0.attn", "--weight", "c_attn.weight"]
    assert main(["new", *arguments, "-o", str(tmp_path / "out")]) == 0
    tests = (tmp_path / "out" / "test_lora_gpt2_attention.py").read_text()
    # Laid out over lines as ruff would (the expression is longer than a line).
    assert (
        "    return transformers.AutoModelForCausalLM.from_config(\n"
        "        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)\n"
        '    ).get_submodule("transformer.h.0.attn")\n'
    ) in tests and "import transformers\n" in tests
    # The attention gets what the model passes it, keywords included (position embeddings, the mask).
    assert "def recorded_call()" in tests and "captured_call()[1].items()" in tests
    result = run_suites([tmp_path / "out"], tmp_path / "junit.xml")
    assert result.returncode == 0, result.stdout[-3000:]


def test_from_model_needs_both_options_and_nothing_else(capsys, tmp_path):
    assert main(["new", "--from-model", "x()", "-o", str(tmp_path)]) == 2
    assert "give it alone" in capsys.readouterr().err
    assert main(["new", "-o", str(tmp_path)]) == 2
    assert "give TARGET, or --from-model" in capsys.readouterr().err
    assert main(["new", "--from-model", f"{TESTS / 'scan_models.py'}:small_model", "--module", "9"]) == 2
    assert "has no submodule '9'" in capsys.readouterr().err
    assert main(["new", "torch.nn.Linear", "--model-input", "{}"]) == 2
    assert "--model-input is what --from-model's model is fed" in capsys.readouterr().err


def test_a_model_input_that_fails_is_said_to_be_the_input(capsys, tmp_path):
    bad = ["new", "--from-model", MIXTRAL, "--module", "model.layers.0.mlp.experts", "--weight", "gate_up_proj"]
    assert main([*bad, "--model-input", "{'input_ids': torch.randn(2, 3)}", "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "the model's forward fails on its input {'input_ids': torch.randn(2, 3)}: " in error
    assert not list(tmp_path.iterdir())


def test_a_subclass_keeping_peft_s_forward_is_peft_s_and_a_module_read_by_its_parent_says_so(capsys, tmp_path):
    """MultiheadAttention's `out_proj` is a NonDynamicallyQuantizableLinear: PEFT's lora.Linear serves it as it serves
    nn.Linear (no command), and is dead there, since the attention reads the weight; `new` on it names the parent."""
    model = f"{TESTS / 'scan_models.py'}:attention_pool_model"
    classes = scanned(capsys, model, "--model-input", "torch.randn(2, 5, 6)")
    out_proj = classes["torch.nn.modules.linear.NonDynamicallyQuantizableLinear"]
    assert out_proj["command"] == "" and out_proj["why_not"] == ""
    assert "lora.Linear, as for its base class, dead at 1.attention.out_proj" in out_proj["handled_by"]
    new = ["new", "--from-model", model, "--module", "1.attention.out_proj", "--model-input", "torch.randn(2, 5, 6)"]
    assert main([*new, "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "never calls 1.attention.out_proj: its parent reads its weights itself" in error, error
    assert "--module 1.attention --weight out_proj.weight" in error and not list(tmp_path.iterdir())


def test_a_weight_named_from_its_parent_names_what_it_leaves_from_there_too():
    from lora_scaffold.generate import _reading_parent
    from lora_scaffold.scan import ScannedClass

    scanned = ScannedClass("m.PassedWeight", 1, "1.mlp", (), (), "", "new ...", "", "1.mlp", "weight", "", ("other",))
    parent = _reading_parent(f"{TESTS / 'scan_models.py'}:passed_weight_model", scanned, set())
    assert (parent.module, parent.weight, parent.unadapted) == ("1", "mlp.weight", ("mlp.other",))


def test_a_model_call_is_plain_data():
    call = ModelCall("m()", "a.b", "{'x': 1}")
    assert call == ModelCall("m()", "a.b", "{'x': 1}") and hash(call)


@pytest.mark.parametrize("module", ["model.layers.0.mlp.experts"])
def test_every_seed_gives_the_model_a_new_input_and_the_same_weights(module):
    request = request_from_model(MIXTRAL, module, None, weight="gate_up_proj")
    first, second = recorded_call(request.model_call, 0)[0][0], recorded_call(request.model_call, 1)[0][0]
    assert first.shape == second.shape and not first.equal(second)
    assert recorded_call(request.model_call, 0)[0][0].equal(first)


def test_what_module_cannot_name_gets_no_command_but_a_reason(capsys):
    bilinear = scanned(capsys, "torch.nn.Bilinear(3, 4, 5)", "--model-input", "(torch.randn(2, 3), torch.randn(2, 4))")
    assert "the model itself, which --module cannot name" in bilinear["torch.nn.modules.linear.Bilinear"]["why_not"]
    model = "torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 4)))"
    linear = scanned(capsys, model, "--model-input", "torch.randn(2, 3)")[
        "torch.nn.modules.linear.Linear (parametrized)"
    ]
    assert linear["command"] == "" and "its parent is the target, and that is the model itself" in linear["why_not"]


TALKER = (
    "transformers.Qwen3OmniMoeTalkerModel(transformers.Qwen3OmniMoeTalkerTextConfig(hidden_size=16, "
    "intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_hidden_layers=1, "
    "num_attention_heads=2, num_key_value_heads=2, vocab_size=64, num_experts=4, num_experts_per_tok=2))"
)


def test_a_decoder_fed_embeddings_by_its_parent_gets_embeddings():
    # Qwen3-Omni's talker names input_ids its main input but has no token embedding to look them up in.
    request = request_from_model(TALKER, "layers.0.mlp.experts", None, weight="gate_up_proj")
    assert request.model_call.model_input == "{'inputs_embeds': torch.randn(2, 8, 16)}"
    assert recorded_call(request.model_call, 0)[0][0].shape == (16, 16)


def test_audio_is_laid_out_as_the_model_reads_it():
    # AST reads a spectrogram, frames first (wav2vec2 a waveform); AudioFlamingo3's encoder needs its features' mask.
    ast = evaluate_model(
        "transformers.AutoModel.from_config(transformers.ASTConfig(hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2))"
    )
    assert default_model_input(ast) == "{'input_values': torch.randn(2, 1024, 128)}"
    encoder = evaluate_model(
        "transformers.AutoModel.from_config(transformers.AudioFlamingo3EncoderConfig(hidden_size=16, "
        "intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))"
    )
    assert default_model_input(encoder) == (
        "{'input_features': torch.randn(2, 128, 3000), 'input_features_mask': torch.ones(2, 3000, dtype=torch.long)}"
    )


def tiny_vision(config: str, **extra) -> str:
    sizes = "hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2"
    extra_text = "".join(f", {key}={value!r}" for key, value in extra.items())
    return f"transformers.AutoModel.from_config(transformers.{config}({sizes}{extra_text}))"


@pytest.mark.parametrize(
    "model, expected",
    [
        # Qwen-VL's tower: 4 x 4 patches of 3 channels, 2 frames, 14 x 14 pixels, flattened, and their grid.
        (
            tiny_vision("Qwen2_5_VLVisionConfig"),
            "{'hidden_states': torch.randn(16, 1176), 'grid_thw': torch.tensor([[1, 4, 4]])}",
        ),
        # Kimi-K2.5's takes the same patches unflattened (the first layout that runs is taken).
        (
            tiny_vision("Kimi_K25VisionConfig"),
            "{'pixel_values': torch.randn(16, 3, 14, 14), 'grid_thw': torch.tensor([[1, 4, 4]])}",
        ),
        # VideoLLaMA3's is told its merge size per image.
        (
            tiny_vision("VideoLlama3VisionConfig"),
            "{'pixel_values': torch.randn(4, 768), 'grid_thw': torch.tensor([[1, 2, 2]]), "
            "'merge_sizes': torch.tensor([1])}",
        ),
        (
            tiny_vision("Siglip2VisionConfig"),
            "{'pixel_values': torch.randn(2, 4, 768), 'pixel_attention_mask': torch.ones(2, 4, dtype=torch.long), "
            "'spatial_shapes': torch.tensor([[2, 2]] * 2)}",
        ),
        # Gemma 4's pools 3 x 3 patches: a grid of 6 x 6 positions.
        (
            tiny_vision("Gemma4VisionConfig", num_key_value_heads=2, head_dim=8),
            "{'pixel_values': torch.randn(2, 36, 768), 'pixel_position_ids': torch.stack(torch.meshgrid("
            "torch.arange(6), torch.arange(6), indexing='xy'), -1).reshape(1, 36, 2).expand(2, -1, -1)}",
        ),
        # MiniCPM's takes one image at a time, with its size in patches.
        (
            tiny_vision("MiniCPMOcrVisionConfig"),
            "{'pixel_values': torch.randn(1, 3, 32, 32), 'target_sizes': torch.tensor([[2, 2]])}",
        ),
        # SmolVLM's tower keeps PreTrainedModel's `input_ids` as its main input, and takes pixel values.
        (tiny_vision("SmolVLMVisionConfig"), "{'pixel_values': torch.randn(2, 3, 224, 224)}"),
        # A video: frames first.
        (
            tiny_vision("VideoMAEConfig", num_frames=4, image_size=32),
            "{'pixel_values': torch.randn(2, 4, 3, 32, 32)}",
        ),
    ],
    ids=["qwen2_5_vl", "kimi_k25", "video_llama_3", "siglip2", "gemma4", "minicpm_ocr", "smolvlm", "videomae"],
)
def test_vision_towers_and_videos_get_the_input_they_read(model, expected):
    built = evaluate_model(model)
    assert default_model_input(built) == expected
    check_runs(built, expected)


def test_a_time_series_gets_its_context_of_past_values():
    patchtst = evaluate_model(
        "transformers.AutoModel.from_config(transformers.PatchTSTConfig(hidden_size=16, num_hidden_layers=1, "
        "num_attention_heads=2, context_length=12, num_input_channels=3))"
    )
    assert default_model_input(patchtst) == "{'past_values': torch.randn(2, 12, 3)}"
    # TimesFM 2.5 reads one series a row, with its padding; TimesFM also its frequency class.
    timesfm = evaluate_model(
        "transformers.AutoModel.from_config(transformers.TimesFm2_5Config(hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8, context_length=64))"
    )
    expected = "{'past_values': torch.randn(2, 64), 'past_values_padding': torch.zeros(2, 64)}"
    assert default_model_input(timesfm) == expected
    check_runs(timesfm, expected)
    timesfm = evaluate_model(
        "transformers.AutoModel.from_config(transformers.TimesFmConfig(hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2, head_dim=8, context_length=64))"
    )
    assert "'freq': torch.zeros(2, 1, dtype=torch.long)" in default_model_input(timesfm)
    check_runs(timesfm, default_model_input(timesfm))
