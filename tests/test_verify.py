"""`verify`: the generated suites' contract checks, run against layers lora-scaffold did not write. It must pass
PEFT's own layers, a correct hand-written layer and every generated example, and catch each mutant of
tests/verify_layers.py with the check named for it."""

import json
import os
import sys

import pytest
from conftest import REPO
from test_cli import listing, run_cli
from verify_layers import MUTANTS

from lora_scaffold import verify
from lora_scaffold.request import Request
from lora_scaffold.workflow import verify_layers


PEFT_LAYERS = {
    "Linear": Request("torch.nn.Linear", ("in_features=8", "out_features=6")),
    "Conv2d": Request("torch.nn.Conv2d", ("in_channels=3", "out_channels=4", "kernel_size=3")),
    "Embedding": Request("torch.nn.Embedding", ("num_embeddings=10", "embedding_dim=6")),
}
PROJECTION = Request("verify_layers.Projection", ("in_features=6", "out_features=5"))
EXAMPLES = REPO / "generated_examples"
STUB = "mypkg_myconv_stub"


def example_layers() -> dict[str, str]:
    """Each generated example's LAYER (file:Class, from its record)."""
    layers = {}
    for folder in sorted(path for path in EXAMPLES.iterdir() if path.is_dir()):
        (record,) = (folder / ".lora-scaffold").glob("*.json")
        data = json.loads(record.read_text())
        layers[folder.name] = f"{folder / data['module_name']}.py:{data['layer_class']}"
    return layers


@pytest.fixture(scope="module")
def verified():
    """Every layer under test, verified in one run (one pytest process for all their suites)."""
    subjects = {f"peft {name}": (f"peft.tuners.lora.layer:{name}", request) for name, request in PEFT_LAYERS.items()}
    subjects["hand-written"] = ("verify_layers:LoraProjection", PROJECTION)
    subjects |= {mutant.__name__: (f"verify_layers:{mutant.__name__}", PROJECTION) for mutant in MUTANTS}
    subjects |= {name: (layer, None) for name, layer in example_layers().items()}
    with pytest.MonkeyPatch.context() as patch:  # the suites import the tests' targets, as the user's would theirs
        patch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
        results = verify_layers(list(subjects.values()))
    return dict(zip(subjects, results))


def failed(verification: verify.Verification) -> set[str]:
    return {check.name for check in verification.failed}


@pytest.mark.parametrize("name", sorted(PEFT_LAYERS))
def test_peft_own_layers_pass_every_check(verified, name):
    verification = verified[f"peft {name}"]
    assert verification.passed, verification.failed
    assert {check.outcome for check in verification.checks} <= {"pass", "skip"}
    assert len([c for c in verification.checks if c.outcome == "pass"]) >= 20


def test_hand_written_layer_passes_and_its_dora_refusal_is_checked(verified):
    verification = verified["hand-written"]
    assert verification.passed, verification.failed
    outcomes = {check.name: check.outcome for check in verification.checks}
    assert outcomes["unsupported options raise [use_dora]"] == "pass"
    assert outcomes["use_dora=True checks"] == "skip"
    assert outcomes["lora bias merges into base bias"] == "pass"
    assert outcomes["mixed batch gives each sample its adapter"] == "pass"


@pytest.mark.parametrize("mutant", list(MUTANTS), ids=lambda mutant: mutant.__name__)
def test_each_mutant_is_caught_by_its_check(verified, mutant):
    verification = verified[mutant.__name__]
    assert not verification.passed
    assert MUTANTS[mutant] in failed(verification), [(c.name, c.outcome, c.detail) for c in verification.checks]


@pytest.mark.parametrize("name", sorted(set(example_layers()) - {STUB}))
def test_every_generated_example_passes(verified, name):
    verification = verified[name]
    assert verification.passed, verification.failed


def test_a_stub_fails_until_it_is_written(verified):
    verification = verified[STUB]
    assert not verification.passed
    assert all("not written yet" in check.detail for check in verification.failed)


def test_the_suite_is_the_generated_one_minus_generated_internals(verified):
    suite = verified["peft Linear"].suite
    assert "from peft.tuners.lora.layer import Linear as LayerUnderTest" in suite
    assert "config._register_custom_module({LinearTarget: LayerUnderTest})" in suite
    assert "_weight_cache" not in suite and "repr(layer)" not in suite


def test_check_names_and_report_reading():
    assert verify.check_name("test_merged_output_equals_unmerged") == "merged output equals unmerged"
    assert verify.check_name("test_unsupported_options_raise[dora]") == "unsupported options raise [dora]"
    report = """<testsuites><testsuite>
      <testcase classname="test_contract_0" name="test_a"/>
      <testcase classname="test_contract_0" name="test_b"><failure message="assert 1 == 2&#10;  more"/></testcase>
      <testcase classname="test_contract_1" name="test_c"><skipped message="no bf16 here"/></testcase>
    </testsuite></testsuites>"""
    assert verify.read_report(report) == {
        "test_contract_0": (verify.Check("a", "pass"), verify.Check("b", "fail", "assert 1 == 2 more")),
        "test_contract_1": (verify.Check("c", "skip", "no bf16 here"),),
    }


LAYER_FILE = str(REPO / "tests" / "verify_layers.py")
PROJECTION_ARGS = ("--target", "verify_layers.Projection", "--arg", "in_features=6", "--arg", "out_features=5")


@pytest.mark.slow  # a second full verify run through the CLI (test_cli_json_passes_for_a_correct_layer stays quick)
def test_cli_prints_a_line_per_check_and_exits_1_on_a_failure(tmp_path):
    result = run_cli(
        sys.executable, "-m", "lora_scaffold", "verify", f"{LAYER_FILE}:IgnoresRslora", *PROJECTION_ARGS, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("on verify_layers.Projection: PEFT's LoRA contract")
    assert "FAIL  rslora scaling: assert 2.0 == 4.0" in result.stdout
    assert "PASS  merged output equals unmerged" in lines
    assert lines[-1].endswith("1 failed, 1 skipped")
    assert listing(tmp_path) == []  # nothing written where it ran


def test_cli_json_passes_for_a_correct_layer(tmp_path):
    arguments = ("verify", f"{LAYER_FILE}:LoraProjection", *PROJECTION_ARGS, "--json")
    result = run_cli(sys.executable, "-m", "lora_scaffold", *arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["command"], data["passed"], data["error"]) == ("verify", True, None)
    assert {"name": "rank must be positive", "outcome": "pass", "detail": ""} in data["checks"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["torch.nn:Linear", "--target", "torch.nn.Linear"], "is not a LoraLayer subclass"),
        (["peft.tuners.lora.layer:NoSuchLayer", "--target", "torch.nn.Linear"], "has no attribute 'NoSuchLayer'"),
        (["nowhere.py:Layer", "--target", "torch.nn.Linear"], "no such file: nowhere.py"),
        (["peft.tuners.lora.layer:Linear"], "give --target"),
        (["peft.tuners.lora.layer:Linear", "--arg", "in_features=3"], "give --target too"),
        (["peft.tuners.lora.layer:Bad-Name", "--target", "torch.nn.Linear"], "should look like"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, arguments, message):
    from lora_scaffold.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["verify", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert listing(tmp_path) == []
