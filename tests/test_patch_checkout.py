"""Patch mode on a real peft source tree: its own tests, dispatch, idempotence, remove, safety.

The tree is the sdist of the installed peft's release (0.17.1 where peft < 0.19 is installed, as in CI's second
environment; tests/conftest.py:PEFT_VERSION), so that PEFT's own tests run with the packages they expect.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import same_tree

from lora_scaffold import journal
from lora_scaffold.cli import main


pytestmark = pytest.mark.slow  # a quick local run: python -m pytest -m 'not slow'


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LORA = Path("src/peft/tuners/lora")
PEFT_RUFF = TESTS / "peft_ruff.toml"


def run_in(checkout: Path, *command: str, with_targets: bool = True) -> subprocess.CompletedProcess:
    paths = [str(checkout / "src")] + ([str(TESTS)] if with_targets else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *command], cwd=checkout, capture_output=True, text=True, env=env)


def run_pytest(checkout: Path, *arguments: str, with_targets: bool = True) -> subprocess.CompletedProcess:
    options = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov"]
    return run_in(checkout, *options, *arguments, with_targets=with_targets)


def count_battery_tests(checkout: Path, selection: str) -> int:
    collected = run_pytest(checkout, "--collect-only", "tests/test_custom_models.py", "-k", selection)
    assert collected.returncode == 0, collected.stdout[-500:]
    return int(collected.stdout.strip().splitlines()[-1].split()[0].split("/")[0])


PLAIN_LINEAR = ["scaffold_targets.PlainLinear", "--arg", "in_features=5", "--arg", "out_features=7"]


def patch_targets(checkout: Path) -> None:
    """A factored layer, a delta layer, and a layer with DoRA (through PEFT's variants)."""
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert main(["new", "scaffold_targets.SquaredConv", "--arg", "padding=1", "--peft-checkout", str(checkout)]) == 0
    assert main(["new", *PLAIN_LINEAR, "--peft-checkout", str(checkout)]) == 0


def test_patched_checkout_passes_generated_tests_peft_battery_and_dispatch(checkout, pristine):
    patch_targets(checkout)
    generated = run_pytest(
        checkout,
        "tests/test_lora_conv_transpose2d.py",
        "tests/test_lora_squared_conv.py",
        "tests/test_lora_plain_linear.py",
    )
    assert generated.returncode == 0 and " passed" in generated.stdout, generated.stdout[-3000:]

    dispatch = run_in(checkout, str(TESTS / "patched_peft_check.py"))
    assert dispatch.returncode == 0 and "dispatch and merge ok" in dispatch.stdout, dispatch.stderr[-3000:]

    selection = "LoRA and (MLP or Conv2d) or LoraConvTranspose2d or LoraSquaredConv or LoraPlainLinear"
    battery = run_pytest(
        checkout,
        "tests/test_custom_models.py",
        "-k",
        selection,
    )
    summary = battery.stdout.strip().splitlines()[-1]
    print("PEFT battery on the patched checkout:", summary)
    assert battery.returncode == 0, battery.stdout[-5000:]
    collected = count_battery_tests(checkout, "LoraConvTranspose2d or LoraSquaredConv or LoraPlainLinear")
    print("PEFT battery tests on the generated layers:", collected)
    # 15 TEST_CASES (ConvTranspose2d: plain, with lin0, rsLoRA, dropout, lora_bias; SquaredConv: no lora_bias;
    # PlainLinear: all five and DoRA) and dozens of battery tests each (36 in peft 0.17.1, 55 in 0.21.2).
    assert collected >= 15 * 30
    assert count_battery_tests(checkout, "LoraPlainLinear and DoRA") >= 30

    assert main(["remove", "scaffold_targets.PlainLinear", "--peft-checkout", str(checkout)]) == 0
    assert main(["remove", "scaffold_targets.SquaredConv", "--peft-checkout", str(checkout)]) == 0
    assert main(["remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)


# Targets built with --init (config-built ones from transformers, as in the README, and a torch class with a single
# output feature), each through the whole of PEFT: (layer class, its test module, arguments of `new`).
# MixtralExperts arrived in transformers 5.
LLAMA_MLP = "LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2))"
MIXTRAL_EXPERTS = "MixtralExperts(MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=3))"
ROUTED_TOKENS = "(torch.randn(4, 8), torch.randint(0, 3, (4, 2)), torch.rand(4, 2))"
BUILT_WITH_INIT = [
    (
        "LoraLlamaMLP",
        "test_lora_llama_mlp.py",
        ["transformers.models.llama.modeling_llama.LlamaMLP", "--init", LLAMA_MLP, "--weight", "down_proj.weight"],
    ),
    (
        "LoraGPT2MLP",
        "test_lora_gpt2mlp.py",
        ["transformers.models.gpt2.modeling_gpt2.GPT2MLP", "--init", "GPT2MLP(32, GPT2Config(n_embd=16))"]
        + ["--weight", "c_proj.weight"],
    ),
    (
        "LoraMixtralExperts",
        "test_lora_mixtral_experts.py",
        ["transformers.models.mixtral.modeling_mixtral.MixtralExperts", "--init", MIXTRAL_EXPERTS]
        + ["--weight", "gate_up_proj", "--example-input", ROUTED_TOKENS],
    ),
    ("LoraBilinear", "test_lora_bilinear.py", ["torch.nn.Bilinear", "--init", "Bilinear(5, 7, 1)"]),
]


def installed(target: str) -> bool:
    module, _, name = target.rpartition(".")
    return hasattr(importlib.import_module(module), name)


def test_targets_built_with_init_pass_generated_tests_and_peft_battery_formatted_as_peft_wants(checkout, pristine):
    targets = [(layer, tests, arguments) for layer, tests, arguments in BUILT_WITH_INIT if installed(arguments[0])]
    for _, _, arguments in targets:
        assert main(["new", *arguments, "--peft-checkout", str(checkout)]) == 0
    generated = run_pytest(checkout, *(f"tests/{tests}" for _, tests, _ in targets))
    assert generated.returncode == 0 and " passed" in generated.stdout, generated.stdout[-3000:]
    battery = run_pytest(checkout, "tests/test_custom_models.py", "-k", " or ".join(layer for layer, _, _ in targets))
    summary = battery.stdout.strip().splitlines()[-1]
    print("PEFT battery on targets built with --init:", summary)
    assert battery.returncode == 0, battery.stdout[-5000:]
    # 4 TEST_CASES or more each (plain, with lin0, rsLoRA, dropout, ...), dozens of PEFT's tests each: none skipped
    # for a missing import (PEFT skips a few on its own, e.g. bias warnings).
    assert int(summary.split(" passed")[0].split()[-1]) >= len(targets) * 4 * 30, summary

    edited = [LORA / "layer.py", Path("tests/test_custom_models.py"), *(Path("tests", t) for _, t, _ in targets)]
    ruff = [sys.executable, "-m", "ruff", "format", "--check", "--config", str(PEFT_RUFF), "--no-cache"]
    formatted = subprocess.run([*ruff, *edited], cwd=checkout, capture_output=True, text=True)
    assert formatted.returncode == 0, formatted.stdout

    for _, _, arguments in targets:
        assert main(["remove", arguments[0], "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)


def test_patched_peft_imports_and_skips_without_the_targets_package(checkout):
    patch_targets(checkout)
    imported = run_in(checkout, "-c", "import peft; from peft.tuners.lora import LoraSquaredConv", with_targets=False)
    assert imported.returncode == 0, imported.stderr[-2000:]
    tests = run_pytest(
        checkout,
        "tests/test_lora_squared_conv.py",
        "tests/test_custom_models.py",
        "-k",
        "LoraSquaredConv or test_lora_squared",
        with_targets=False,
    )
    assert tests.returncode == 0 and "skipped" in tests.stdout, tests.stdout[-2000:]


def test_added_code_satisfies_peft_ruff_settings(checkout, pristine):
    patch_targets(checkout)
    new_files = [
        LORA / "lora_conv_transpose2d.py",
        LORA / "lora_squared_conv.py",
        LORA / "lora_plain_linear.py",
        Path("tests/test_lora_squared_conv.py"),
        Path("tests/test_lora_plain_linear.py"),
    ]
    edited = [LORA / "layer.py", LORA / "__init__.py", Path("tests/test_custom_models.py")]
    ruff = [sys.executable, "-m", "ruff"]
    config = ["--config", str(PEFT_RUFF), "--no-cache"]
    for path in new_files:
        check = subprocess.run([*ruff, "check", *config, path], cwd=checkout, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    formatted = subprocess.run(
        [*ruff, "format", "--check", *config, *new_files, *edited], cwd=checkout, capture_output=True, text=True
    )
    assert formatted.returncode == 0, formatted.stdout
    for path in edited:
        before = subprocess.run(
            [*ruff, "check", *config, "--statistics", path], cwd=pristine, capture_output=True, text=True
        )
        after = subprocess.run(
            [*ruff, "check", *config, "--statistics", path], cwd=checkout, capture_output=True, text=True
        )
        assert after.stdout == before.stdout, path


def test_second_run_changes_nothing_and_says_so(checkout, capsys):
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    snapshot = {p: p.read_bytes() for p in checkout.rglob("*.py")}
    capsys.readouterr()
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in checkout.rglob("*.py")} == snapshot


def test_dry_run_shows_a_diff_and_writes_nothing(checkout, pristine, capsys):
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+    elif isinstance(target_base_layer, torch.nn.ConvTranspose2d):" in out
    assert "+from .lora_conv_transpose2d import LoraConvTranspose2d" in out
    assert same_tree(checkout, pristine)


def test_type_peft_supports_needs_force(checkout, pristine, capsys):
    assert main(["new", "torch.nn.Linear", "--peft-checkout", str(checkout)]) == 2
    assert "PEFT already supports torch.nn.Linear with its own Linear layer; pass --force" in capsys.readouterr().err
    assert same_tree(checkout, pristine)
    assert main(["new", "torch.nn.Linear", "--peft-checkout", str(checkout), "--force"]) == 0
    layer = (checkout / LORA / "layer.py").read_text()
    assert layer.index("isinstance(target_base_layer, torch.nn.Linear):\n        from .lora_linear") < layer.index(
        "elif isinstance(target_base_layer, torch.nn.Linear):\n        if "
    )


def test_another_class_under_the_same_name_is_an_error(checkout, capsys):
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    capsys.readouterr()
    arguments = ["new", "torch.nn.ConvTranspose1d", "--name", "conv_transpose2d", "--peft-checkout", str(checkout)]
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert "lora_conv_transpose2d.py already exists and is lora-scaffold's layer for torch.nn.ConvTranspose2d" in err


def test_remove_refuses_user_edits_unless_forced(checkout, pristine, capsys):
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    layer_module = checkout / LORA / "lora_conv_transpose2d.py"
    layer_module.write_text(layer_module.read_text() + "# my fix\n")
    capsys.readouterr()
    assert main(["remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 2
    assert "lora_conv_transpose2d.py changed since lora-scaffold wrote it; pass --force" in capsys.readouterr().err
    assert layer_module.exists()
    assert main(["remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout), "--force"]) == 0
    assert same_tree(checkout, pristine)


def test_a_failure_between_file_writes_leaves_the_checkout_as_it_was(checkout, pristine, monkeypatch):
    real_replace = os.replace
    calls = []

    def fail_third(source, destination):
        calls.append(destination)
        if len(calls) == 3:
            raise OSError(5, "Input/output error", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(journal.os, "replace", fail_third)
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 2
    assert len(calls) == 3
    assert same_tree(checkout, pristine)


def test_symlinks_inside_the_checkout_are_refused(checkout, tmp_path, capsys):
    outside = tmp_path / "outside.py"
    outside.write_text("x = 1\n")
    (checkout / "tests" / "test_lora_conv_transpose2d.py").symlink_to(outside)
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert outside.read_text() == "x = 1\n"


def test_not_a_checkout_is_explained(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a peft source checkout: src/peft/tuners/lora/layer.py" in err and err.count("\n") == 1


def test_a_target_peft_battery_cannot_take_gets_no_battery_entry(checkout, pristine, capsys):
    arguments = ["torch.nn.GRU", "--arg", "input_size=6", "--arg", "hidden_size=8", "--weight", "weight_ih_l0"]
    assert main(["new", *arguments, "--peft-checkout", str(checkout)]) == 0
    assert "GRU.bias is a bool" in capsys.readouterr().out
    battery = Path("tests/test_custom_models.py")
    assert (checkout / battery).read_bytes() == (pristine / battery).read_bytes()
    assert (checkout / "tests" / "test_lora_gru.py").is_file()
    assert main(["remove", "torch.nn.GRU", "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)


def test_new_with_other_arguments_replaces_the_earlier_patch_and_remove_undoes_it(checkout, pristine, capsys):
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert main(["new", "torch.nn.ConvTranspose2d", "--arg", "stride=2", "--peft-checkout", str(checkout)]) == 0
    battery = (checkout / "tests" / "test_custom_models.py").read_text()
    assert battery.count("class ModelLoraConvTranspose2d") == 1 and "stride=2" in battery
    assert main(["remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)


def test_patched_files_keep_their_mode_and_new_ones_follow_the_umask(checkout):
    layer = checkout / LORA / "layer.py"
    layer.chmod(0o664)
    assert main(["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert layer.stat().st_mode & 0o777 == 0o664
    umask = os.umask(0)
    os.umask(umask)
    assert (checkout / LORA / "lora_conv_transpose2d.py").stat().st_mode & 0o777 == 0o666 & ~umask


def test_pull_request_description_states_what_a_fresh_run_of_the_tests_gives(checkout, pristine, capsys):
    """The type is named in PEFT's "not supported" message; the description says what was done and, with
    --run-tests, the counts of both runs, which a run of our own gives again; remove takes all of it back."""
    command = ["new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout), "--run-tests", "--json"]
    assert main(command) == 0
    report = json.loads(capsys.readouterr().out)
    model = (checkout / LORA / "model.py").read_text()
    assert '"`torch.nn.ConvTranspose2d`, "\n                "`transformers.pytorch_utils.Conv1D`' in model
    description = (checkout / ".lora-scaffold" / "lora_conv_transpose2d.pr.md").read_text()
    assert report["pull_request"]["path"].endswith("lora_conv_transpose2d.pr.md")
    assert report["pull_request"]["description"] == description
    assert description.startswith("# Add LoRA support for `torch.nn.ConvTranspose2d`")
    assert "| conv_transpose | exact: relative error at most" in description
    assert "| use_dora | refused (ValueError): PEFT has no DoRA for transposed convolutions |" in description
    assert "- `src/peft/tuners/lora/model.py` (update)" in description
    tests = {result["name"]: result for result in report["pull_request"]["tests"]}
    suite, battery = tests["generated suite"], tests["PEFT's battery"]
    assert suite["failed"] == battery["failed"] == 0 and suite["passed"] > 0 and battery["passed"] > 0
    assert f"| generated suite | {suite['passed']} | 0 | {suite['skipped']} |" in description
    assert f"| PEFT's battery | {battery['passed']} | 0 | {battery['skipped']} |" in description
    fresh = run_pytest(checkout, "tests/test_custom_models.py", "-k", "LoraConvTranspose2d", with_targets=False)
    assert f"{battery['passed']} passed, {battery['skipped']} skipped" in fresh.stdout, fresh.stdout[-2000:]
    assert main(["remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)


def test_a_quantized_base_gets_a_backend_peft_s_other_tuners_merge_through(checkout, pristine):
    """optimum-quanto's QLinear, which PEFT has no quantization backend for: patch mode adds one (in the layer's
    module, returned by resolve_quantization_backend), through which OFT merges correctly."""
    pytest.importorskip("optimum.quanto")
    utils = checkout / "src/peft/utils/quantization_utils.py"
    if not utils.is_file() or "class QuantizationBackend" not in utils.read_text():
        pytest.skip("this peft has no QuantizationBackend (peft 0.21 on)")
    arguments = ["optimum.quanto.nn.QLinear", "--init", "quantized_layers.quanto_linear(8)"]
    assert main(["new", *arguments, "--peft-checkout", str(checkout)]) == 0
    generated = run_pytest(checkout, "tests/test_lora_q_linear.py")
    assert generated.returncode == 0 and " passed" in generated.stdout, generated.stdout[-3000:]
    check = run_in(checkout, str(TESTS / "patched_backend_check.py"))
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    edited = [Path("src/peft/utils/quantization_utils.py"), LORA / "lora_q_linear.py"]
    ruff = [sys.executable, "-m", "ruff", "format", "--check", "--config", str(PEFT_RUFF), "--no-cache"]
    formatted = subprocess.run([*ruff, *edited], cwd=checkout, capture_output=True, text=True)
    assert formatted.returncode == 0, formatted.stdout
    assert main(["remove", "optimum.quanto.nn.QLinear", "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)


COMPRESSED_CHECK = """
import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from peft.utils.quantization_utils import resolve_quantization_backend
from quantized_layers import compressed_linear

model = nn.Sequential(compressed_linear(8), nn.Linear(8, 4))
assert type(resolve_quantization_backend(model[0])).__name__ == "LoraCompressedBackend"
assert resolve_quantization_backend(model[1]) is None
peft_model = get_peft_model(model, LoraConfig(target_modules=["0", "1"]))
layers = [type(peft_model.base_model.model[index]).__name__ for index in (0, 1)]
assert layers == ["LoraCompressed", "Linear"], layers
"""


def test_an_nn_linear_told_apart_by_its_tensors_gets_a_branch_for_those_only(checkout, pristine):
    """compressed-tensors' frozen nn.Linear, a class PEFT adapts itself: no --force needed, since the dispatch
    branch (and the quantization backend's) test the tensors it holds beside its weight; plain nn.Linear stay PEFT's."""
    pytest.importorskip("compressed_tensors")
    arguments = ["torch.nn.Linear", "--init", "quantized_layers.compressed_linear(8)", "--name", "compressed"]
    assert main(["new", *arguments, "--peft-checkout", str(checkout)]) == 0
    layer_py = (checkout / "src/peft/tuners/lora/layer.py").read_text()
    assert 'and hasattr(target_base_layer, "weight_scale")' in layer_py
    generated = run_pytest(checkout, "tests/test_lora_compressed.py")
    assert generated.returncode == 0 and " passed" in generated.stdout, generated.stdout[-3000:]
    utils = (checkout / "src/peft/utils/quantization_utils.py").read_text()
    if "class QuantizationBackend" in utils:  # peft 0.21 on
        check = run_in(checkout, "-c", COMPRESSED_CHECK)
        assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    edited = ["src/peft/tuners/lora/layer.py", "src/peft/utils/quantization_utils.py"]
    ruff = [sys.executable, "-m", "ruff", "format", "--check", "--config", str(PEFT_RUFF), "--no-cache"]
    formatted = subprocess.run([*ruff, *edited], cwd=checkout, capture_output=True, text=True)
    assert formatted.returncode == 0, formatted.stdout
    assert main(["remove", "torch.nn.Linear", "--name", "compressed", "--peft-checkout", str(checkout)]) == 0
    assert same_tree(checkout, pristine)
