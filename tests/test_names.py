"""Names in generated code: every name it binds is known, and a target named like one of them still works."""

import ast

import pytest
from suite_process import run_pytest
from test_end_to_end import pytest_env
from test_render import plan_for

from lora_scaffold.cli import main
from lora_scaffold.errors import AnalysisError
from lora_scaffold.names import GENERATED_NAMES, layer_names, target_alias
from lora_scaffold.peft_release import PATCH, PLUGIN, PeftRelease
from lora_scaffold.render import render


def bound_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return {name for name in names if not name.startswith("test_")}


@pytest.mark.parametrize(
    "target, args, options",
    [
        ("torch.nn.Linear", {}, {}),
        ("scaffold_targets.CountingLinear", {}, {}),
        ("torch.nn.Conv2d", {}, {}),
        ("torch.nn.Embedding", {}, {}),
        ("torch.nn.Bilinear", {}, {}),
        ("torch.nn.GRU", {"input_size": 6, "hidden_size": 8}, {"weight": "weight_ih_l0"}),
        ("torch.nn.Linear", {}, {"strategy": "stub", "name": "stubbed"}),
    ],
)
def test_every_name_generated_code_binds_is_known(target, args, options):
    plan = plan_for(target, args, options)
    for peft in (PeftRelease(PLUGIN, (0, 21, 2)), PeftRelease(PATCH, (0, 17, 1)), PeftRelease(PLUGIN, (0, 13, 2))):
        for generated in render(plan, peft):
            ours = {plan.names.layer_class, plan.target.class_name, target_alias(plan.target.class_name)}
            unknown = bound_names(generated.text) - GENERATED_NAMES - ours
            assert not unknown, (generated.path, unknown)


@pytest.mark.parametrize("name", ["config", "layer", "Config"])
def test_a_layer_class_named_like_a_generated_name_is_refused(name):
    with pytest.raises(AnalysisError, match="which generated code uses; pick another --name"):
        layer_names("Anything", name)


def test_targets_named_like_generated_names_get_working_suites(tmp_path):
    for target in ("colliding_names.LoraConfig", "colliding_names.Linear", "colliding_names.Wrapper"):
        assert main(["new", target, "-o", str(tmp_path)]) == 0
    # Built with --init, the expression names the class as the tests import it (their own Wrapper is another).
    assert (
        main(["new", "colliding_names.Wrapper", "--init", "Wrapper(4, 6, 3)", "--name", "built", "-o", str(tmp_path)])
        == 0
    )
    layer = (tmp_path / "lora_linear.py").read_text()
    assert "from colliding_names import Linear as LinearTarget" in layer
    assert "from peft.tuners.lora.layer import Linear, ParamWrapper\n" in layer
    built_tests = (tmp_path / "test_lora_built.py").read_text()
    assert "from colliding_names import Wrapper as WrapperTarget\n" in built_tests
    assert "return WrapperTarget(4, 6, 3)\n" in built_tests
    result = run_pytest(["-q", "-p", "no:cacheprovider", str(tmp_path)], tmp_path, pytest_env(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:]
    assert " 0 failed" not in result.stdout and "passed" in result.stdout


def test_hostile_paths_and_parameter_names_never_become_code(tmp_path):
    folder = tmp_path / 'we\'ird """qzdir\\x\nos.system("boom")'
    folder.mkdir()
    (folder / "layers.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Gate(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        '        self.register_parameter("w\'\\"x", nn.Parameter(torch.randn(4, 6)))\n\n'
        '    def forward(self, x):\n        return torch.sigmoid(x @ getattr(self, "w\'\\"x").T)\n'
    )
    out = tmp_path / "out"
    assert main(["new", f"{folder}/layers.py:Gate", "-o", str(out)]) == 0
    for path in out.glob("*.py"):
        text = path.read_text()
        ast.parse(text)
        assert "boom" not in text and "qzdir" not in text  # markers no generated word contains
    result = run_pytest(["-q", "-p", "no:cacheprovider", str(out)], tmp_path, pytest_env(folder))
    assert result.returncode == 0, result.stdout[-3000:]
