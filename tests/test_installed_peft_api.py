"""The generated layer speaks the API of the installed peft: run in both CI environments (peft 0.21 and 0.17)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_scaffold.cli import main
from lora_scaffold.errors import ScaffoldError
from lora_scaffold.peft_release import CONFIG_API, KWARGS_API, LORA_VARIANTS, PLUGIN, installed_peft, release_for


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TARGETS = [
    ("convt", ["torch.nn.ConvTranspose2d", "--arg", "stride=2", "--name", "api_convt"]),
    ("grouped", ["torch.nn.Conv2d", "--arg", "groups=2", "--name", "api_grouped"]),
    ("embedding", ["torch.nn.Embedding", "--name", "api_embedding"]),
    ("gpt2", ["transformers.pytorch_utils.Conv1D", "--name", "api_gpt2"]),
    ("squared", ["scaffold_targets.SquaredConv", "--name", "api_squared"]),
    ("bilinear", ["torch.nn.Bilinear", "--name", "api_bilinear"]),
    ("mypkg", ["mypkg.MyConv", "--name", "api_myconv"]),
    ("conv1d", ["torch.nn.Conv1d", "--name", "api_conv1d"]),
]


@pytest.mark.parametrize(
    "version, api", [("0.21.2", CONFIG_API), ("0.19.0", CONFIG_API), ("0.18.1", KWARGS_API), ("0.13.0", KWARGS_API)]
)
def test_api_follows_the_peft_version(version, api):
    assert release_for(PLUGIN, version).api == api


@pytest.mark.parametrize("version, expected", [("0.21.2", True), ("0.16.0", True), ("0.15.2", False)])
def test_lora_variants_arrived_in_peft_0_16(version, expected):
    assert release_for(PLUGIN, version).has(LORA_VARIANTS) is expected


def test_peft_older_than_0_13_or_missing_is_refused():
    with pytest.raises(ScaffoldError, match=r"peft 0.12.0 is too old: lora-scaffold generates layers for peft>=0.13"):
        release_for(PLUGIN, "0.12.0")
    with pytest.raises(ScaffoldError, match="peft is not installed"):
        release_for(PLUGIN, None)


@pytest.mark.slow  # suites run once more (CI's peft 0.17 environment runs this file whole)
def test_generated_suites_pass_with_the_installed_peft(tmp_path):
    peft = installed_peft()
    for folder, arguments in TARGETS:
        assert main(["new", *arguments, "-o", str(tmp_path / folder)]) == 0
        layer = next((tmp_path / folder).glob("lora_*.py")).read_text()
        assert f"for {peft.versions}." in layer
        assert "hasattr(" not in layer
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    print(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-5000:]
