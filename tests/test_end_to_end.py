"""Run the CLI as a user would, then run the generated test suites with pytest in a fresh process."""

import json
import os
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from suite_process import run_pytest

from lora_scaffold.cli import main


REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# (folder, arguments of `lora-scaffold new`, strategy the generator must choose). generated_examples/ adds the zoo
# below, run from its committed files.
TARGETS = [
    (
        "strided_convt",
        ["torch.nn.ConvTranspose2d", "--arg", "stride=2", "--arg", "output_padding=1", "--name", "strided_convt"],
        "conv_transpose",
    ),
    ("grouped_convt1d", ["torch.nn.ConvTranspose1d", "--arg", "groups=2", "--arg", "dilation=2"], "conv_transpose"),
    ("squared_conv", ["scaffold_targets.SquaredConv", "--arg", "padding=1"], "delta"),
    ("nested_conv", ["scaffold_targets.NestedConv", "--weight", "conv.weight"], "delta"),
    ("required_args", ["scaffold_targets.RequiredArgs", "--arg", "width=5", "--arg", "depth=3"], "linear"),
    ("plain_linear", ["scaffold_targets.PlainLinear"], "linear"),
    ("counting_linear", ["scaffold_targets.CountingLinear"], "reuse"),
    ("traced_conv", ["scaffold_targets.TracedConv2d", "--arg", "padding=1"], "reuse"),
    ("normalized_linear", ["scaffold_targets.NormalizedLinear"], "delta"),
    (
        "grouped_conv",
        ["torch.nn.Conv2d", "--arg", "groups=2", "--arg", "dilation=2", "--name", "grouped_conv"],
        "conv",
    ),
    (
        "depthwise_conv",
        ["torch.nn.Conv1d", "--arg", "groups=4", "--arg", "out_channels=4", "--name", "depthwise"],
        "conv",
    ),
    ("embedding", ["torch.nn.Embedding", "--arg", "padding_idx=0"], "embedding"),
    ("huge_embedding", ["scaffold_targets.HugeEmbedding"], "embedding"),
    (
        "lstm",
        ["torch.nn.LSTM", "--arg", "input_size=5", "--arg", "hidden_size=4", "--weight", "weight_hh_l0"],
        "delta",
    ),
]
EXAMPLES = REPO / "generated_examples"
EXAMPLE_STRATEGIES = {
    "conv_transpose2d": "conv_transpose",
    "bilinear": "delta",
    "embedding_bag": "delta",
    "gru": "delta",
    "gpt2_conv1d": "linear",
    "mypkg_myconv": "conv",
    "mypkg_myconv_stub": "stub",
    "mypkg_token_embedding": "embedding",
    "mypkg_int8_linear": "beside",
    "qwen2_moe_experts": "experts",
}


def strategy_of(folder: Path) -> str:
    record = next((folder / ".lora-scaffold").glob("*.json"))
    return json.loads(record.read_text())["strategy"]


def pytest_env(*paths: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (*paths, REPO, TESTS))}


def run_suites(folders: list[Path], junit: Path, extra_paths: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """The suites in `folders` run by pytest in a process of their own (see suite_process.py)."""
    arguments = ["-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *map(str, folders)]
    return run_pytest(arguments, junit.parent, pytest_env(*extra_paths))


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
    for folder, arguments, _ in TARGETS:
        assert main(["new", *arguments, "-o", str(root / folder)]) == 0
    return root


def test_generator_chooses_the_expected_strategies(generated_suites):
    chosen = {folder: strategy_of(generated_suites / folder) for folder, _, _ in TARGETS}
    assert chosen == {folder: strategy for folder, _, strategy in TARGETS}
    assert {folder: strategy_of(EXAMPLES / folder) for folder in EXAMPLE_STRATEGIES} == EXAMPLE_STRATEGIES


def test_generated_suites_pass(generated_suites, tmp_path):
    examples = [EXAMPLES / folder for folder, strategy in EXAMPLE_STRATEGIES.items() if strategy != "stub"]
    folders = [generated_suites / folder for folder, _, _ in TARGETS] + examples
    result = run_suites(folders, tmp_path / "junit.xml")
    counts = suite_counts(tmp_path / "junit.xml")
    print("\n".join(f"{module}: {outcome}" for module, outcome in sorted(counts.items())))
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert len(counts) == len(folders), counts
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
    arguments = ["-q", "-p", "no:cacheprovider", str(tmp_path / "out")]
    result = run_pytest(arguments, tmp_path, pytest_env(tmp_path / "src"))
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow  # a whole suite run to see the stub fail (the stub's render is checked quickly in test_render)
def test_stub_suite_fails_and_says_why(tmp_path):
    result = run_suites([EXAMPLES / "mypkg_myconv_stub"], tmp_path / "junit.xml")
    assert result.returncode == 1
    assert "lora-scaffold stub: LoraMyConvStub._create_lora_factors is not written yet" in result.stdout
    counts = suite_counts(tmp_path / "junit.xml")["test_lora_my_conv_stub"]
    assert counts["failed"] >= 14
