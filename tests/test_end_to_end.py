"""Run the CLI as a user would, then run the generated test suites with pytest in a fresh process."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from lora_scaffold.cli import main


REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# (folder, arguments of `lora-scaffold new`, strategy the generator must choose); generated_examples/ (run with
# these) adds torch.nn.ConvTranspose2d with defaults and the demo mypkg.MyConv.
TARGETS = [
    (
        "strided_convt",
        ["torch.nn.ConvTranspose2d", "--arg", "stride=2", "--arg", "output_padding=1", "--name", "strided_convt"],
        "delta",
    ),
    ("bilinear", ["torch.nn.Bilinear"], "delta"),
    ("gpt2_conv1d", ["transformers.pytorch_utils.Conv1D", "--name", "gpt2_conv1d"], "linear"),
    ("squared_conv", ["scaffold_targets.SquaredConv", "--arg", "padding=1"], "delta"),
    ("nested_conv", ["scaffold_targets.NestedConv", "--weight", "conv.weight"], "delta"),
    ("required_args", ["scaffold_targets.RequiredArgs", "--arg", "width=5", "--arg", "depth=3"], "linear"),
    ("plain_linear", ["scaffold_targets.PlainLinear"], "linear"),
    (
        "grouped_conv",
        ["torch.nn.Conv2d", "--arg", "groups=2", "--arg", "dilation=2", "--name", "grouped_conv"],
        "conv",
    ),
    ("embedding", ["torch.nn.Embedding", "--arg", "padding_idx=0"], "embedding"),
    ("embedding_bag", ["torch.nn.EmbeddingBag"], "delta"),
    ("gru", ["torch.nn.GRU", "--arg", "input_size=6", "--arg", "hidden_size=8", "--weight", "weight_ih_l0"], "delta"),
]


def pytest_env(*paths: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (*paths, REPO, TESTS))}


def run_suites(folders: list[Path], junit: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *map(str, folders),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=pytest_env(), cwd=junit.parent)


def suite_counts(junit: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        module = case.get("classname").rpartition(".")[2] if "." in case.get("classname") else case.get("classname")
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
        outcome = "skipped" if case.find("skipped") is not None else outcome
        counts.setdefault(module, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
    return counts


@pytest.fixture(scope="module")
def generated_suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    strategies = {}
    for folder, arguments, _ in TARGETS:
        assert main(["new", *arguments, "-o", str(root / folder)]) == 0
        layer = next((root / folder).glob("lora_*.py")).read_text()
        strategies[folder] = layer.split("Strategy: ", 1)[1].split(".", 1)[0]
    return root, strategies


def test_generator_chooses_the_expected_strategies(generated_suites):
    _, strategies = generated_suites
    assert strategies == {folder: strategy for folder, _, strategy in TARGETS}


def test_generated_suites_pass(generated_suites, tmp_path):
    root, _ = generated_suites
    folders = [root / folder for folder, _, _ in TARGETS] + [REPO / "generated_examples"]
    result = run_suites(folders, tmp_path / "junit.xml")
    counts = suite_counts(tmp_path / "junit.xml")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert len(counts) == len(TARGETS) + 2, counts
    for module, outcome in counts.items():
        assert outcome["failed"] == 0 and outcome["skipped"] == 0 and outcome["passed"] >= 17, (module, outcome)


def test_file_path_target_works_end_to_end(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "my_layers.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Gate(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.proj = nn.Parameter(torch.randn(4, 16))\n\n"
        "    def forward(self, x):\n        return torch.sigmoid(x @ self.proj.T)\n"
    )
    assert main(["new", f"{tmp_path / 'src' / 'my_layers.py'}:Gate", "-o", str(tmp_path / "out")]) == 0
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=pytest_env(tmp_path / "src"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]


def test_stub_suite_fails_and_says_why(tmp_path):
    assert main(["new", "mypkg.MyConv", "--strategy", "stub", "-o", str(tmp_path / "stub")]) == 0
    result = run_suites([tmp_path / "stub"], tmp_path / "junit.xml")
    assert result.returncode == 1
    assert "lora-scaffold stub: LoraMyConv._create_adapter is not written yet" in result.stdout
    counts = suite_counts(tmp_path / "junit.xml")["test_lora_my_conv"]
    assert counts["failed"] >= 14
