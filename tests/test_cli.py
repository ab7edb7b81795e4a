import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_scaffold.cli import main


REPO = Path(__file__).resolve().parent.parent


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_new_writes_layer_and_tests_and_reports_the_choice(tmp_path, capsys):
    assert main(["new", "torch.nn.Conv1d", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert listing(tmp_path) == [".lora-scaffold/lora_conv1d.json", "lora_conv1d.py", "test_lora_conv1d.py"]
    assert "strategy  conv: auto: the probe shows the weight acts as conv" in out
    assert "dora      through PEFT's DoRA variant" in out
    assert "input     torch.randn(2, 4, 6) (inferred)" in out
    assert f"create    {tmp_path / 'lora_conv1d.py'}" in out


def test_new_says_why_dora_is_refused(tmp_path, capsys):
    assert main(["new", "torch.nn.Conv2d", "--arg", "groups=2", "-o", str(tmp_path)]) == 0
    assert "dora      refused (use_dora=True raises): PEFT's DoRA composes B @ A ungrouped" in capsys.readouterr().out


def test_second_run_is_identical_and_a_user_edit_is_not_overwritten(tmp_path, capsys):
    assert main(["new", "torch.nn.Linear", "-o", str(tmp_path)]) == 0
    assert main(["new", "torch.nn.Linear", "-o", str(tmp_path)]) == 0
    assert f"identical {tmp_path / 'lora_linear.py'}" in capsys.readouterr().out
    edited = tmp_path / "lora_linear.py"
    edited.write_text("# my edits\n")
    assert main(["new", "torch.nn.Linear", "-o", str(tmp_path)]) == 2
    assert f"{edited} already exists with other content; pass --force" in capsys.readouterr().err
    assert edited.read_text() == "# my edits\n"
    assert main(["new", "torch.nn.Linear", "-o", str(tmp_path), "--force"]) == 0
    assert "class LoraLinear" in edited.read_text()


def test_a_new_run_with_other_options_replaces_unedited_files_without_force(tmp_path, capsys):
    assert main(["new", "torch.nn.Linear", "-o", str(tmp_path)]) == 0
    assert main(["new", "torch.nn.Linear", "--arg", "in_features=5", "-o", str(tmp_path)]) == 0
    assert f"update    {tmp_path / 'test_lora_linear.py'}" in capsys.readouterr().out
    record = json.loads((tmp_path / ".lora-scaffold" / "lora_linear.json").read_text())
    assert record["request"]["args"] == ["in_features=5"] and record["constructor"]["in_features"] == "5"


def test_dry_run_prints_the_files_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(["new", "torch.nn.Linear", "-o", str(out_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would create    {out_dir / 'lora_linear.py'}" in out
    assert "+class LoraLinear(nn.Module, LoraLayer):" in out
    assert not out_dir.exists()


def test_inspect_prints_what_the_generator_sees(capsys):
    assert main(["inspect", "torch.nn.Conv2d", "--arg", "groups=2"]) == 0
    out = capsys.readouterr().out
    assert "built with  (in_channels=4, out_channels=6, kernel_size=3, groups=2)" in out
    assert "  weight                   [6, 2, 3, 3] float32" in out
    assert "  groups                   2" in out


def test_inspect_json(capsys):
    assert main(["inspect", "torch.nn.Linear", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"][0] == {
        "name": "weight",
        "shape": [12, 8],
        "dtype": "float32",
        "requires_grad": True,
        "computed": False,
        "quantized": False,
        "holder": "",
        "rounded": "",
    }


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="no module named"):
        main(["new", "nosuchpkg_xyz.Layer", "--debug"])


def run_cli(*arguments, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, env=env)


@pytest.mark.slow  # installs and runs the console script in subprocesses
def test_console_script_and_module_entry_point_work_from_any_folder(tmp_path):
    script = run_cli("lora-scaffold", "new", "torch.nn.Embedding", "-o", "out", cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    module = run_cli(sys.executable, "-m", "lora_scaffold", "new", "torch.nn.Embedding", "-o", "out", cwd=tmp_path)
    assert module.returncode == 0 and "identical" in module.stdout, module.stderr
    assert listing(tmp_path / "out") == [
        ".lora-scaffold/lora_embedding.json",
        "lora_embedding.py",
        "test_lora_embedding.py",
    ]


@pytest.mark.slow  # imports peft in a subprocess
def test_a_command_importing_peft_says_nothing_on_stderr_off_a_terminal(tmp_path):
    # Not the lines torchao, torch and bitsandbytes log when PEFT's import reaches them, where they are installed (as
    # here; bitsandbytes' on a CPU with AVX512-BF16).
    result = run_cli(
        "lora-scaffold", "scan", "torch.nn.Linear(2, 3)", "--model-input", "torch.randn(1, 2)", cwd=tmp_path
    )
    assert result.returncode == 0 and "lora.Linear" in result.stdout and result.stderr == "", result.stderr


def test_console_script_errors_are_one_line(tmp_path):
    result = run_cli("lora-scaffold", "new", "scaffold_targets.OnlyBuffers", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert listing(tmp_path) == []


def test_help_explains_strategies():
    result = subprocess.run(["lora-scaffold", "new", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for word in ("auto", "linear", "conv", "embedding", "delta", "stub", "--example-input", "--dry-run"):
        assert word in result.stdout
