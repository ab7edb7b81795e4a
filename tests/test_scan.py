"""`scan` a model: which classes hold weights, which PEFT handles, and a `new` command that works for the rest."""

import json
import shlex
from pathlib import Path

from test_end_to_end import run_suites

from lora_scaffold.cli import main


TESTS = Path(__file__).resolve().parent
MIXTRAL = (
    "transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(hidden_size=16, intermediate_size=32, "
    "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, vocab_size=64))"
)


def scanned(capsys, model: str) -> dict[str, dict]:
    assert main(["scan", model, "--json"]) == 0
    return {c["qualified_name"]: c for c in json.loads(capsys.readouterr().out)["classes"]}


def test_scan_a_factory_in_a_file_and_run_the_commands_it_gives(capsys, tmp_path, monkeypatch):
    classes = scanned(capsys, f"{TESTS / 'scan_models.py'}:small_model")
    assert classes["torch.nn.modules.linear.Linear"]["handled_by"] == "lora.Linear"
    assert "nothing for LoRA" in classes["torch.nn.modules.normalization.LayerNorm"]["why_not"]
    squared = classes["scaffold_targets.SquaredConv"]
    plain = classes["scaffold_targets.PlainLinear"]
    assert squared["handled_by"] == "lora.Conv2d, as its base class" and "--arg in_channels=3" in squared["command"]
    assert plain["command"] == "" and "takes 'in_features', which the instance does not keep" in plain["why_not"]
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(squared["command"])[1:]) == 0
    assert [p.name for p in (tmp_path / "lora_layers").glob("lora_*.py")] == ["lora_squared_conv.py"]


def test_scan_a_transformers_moe_model_built_from_a_config(capsys):
    classes = scanned(capsys, MIXTRAL)
    experts = classes["transformers.models.mixtral.modeling_mixtral.MixtralExperts"]
    assert experts["handled_by"] == "" and experts["weights"]["down_proj"] == [4, 16, 32]
    assert "takes 'config', which is no literal: build it with --init EXPR" in experts["why_not"]
    assert classes["torch.nn.modules.linear.Linear"]["handled_by"] == "lora.Linear"
    assert main(["scan", MIXTRAL]) == 0
    assert "MixtralExperts  x1 (model.layers.0.mlp.experts)" in capsys.readouterr().out


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
    result = run_suites([tmp_path / "out"], tmp_path / "junit.xml")
    assert result.returncode == 0, result.stdout[-3000:]


def test_from_model_needs_both_options_and_nothing_else(capsys, tmp_path):
    assert main(["new", "--from-model", "x()", "-o", str(tmp_path)]) == 2
    assert "give it alone" in capsys.readouterr().err
    assert main(["new", "-o", str(tmp_path)]) == 2
    assert "give TARGET, or --from-model" in capsys.readouterr().err
    assert main(["new", "--from-model", f"{TESTS / 'scan_models.py'}:small_model", "--module", "9"]) == 2
    assert "has no submodule '9'" in capsys.readouterr().err
