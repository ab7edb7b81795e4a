"""Every command speaks JSON with --json (one object on stdout, errors too, same exit codes), and colours its
text only on a terminal without NO_COLOR."""

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from lora_scaffold.cli import main


REPO = Path(__file__).resolve().parent.parent
FILES = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["path", "status"],
        "properties": {
            "path": {"type": "string"},
            "status": {"enum": ["create", "identical", "update", "overwrite", "conflict", "delete"]},
            "diff": {"type": "string"},
        },
    },
}
STRINGS = {"type": "array", "items": {"type": "string"}}
SCHEMAS = {
    "new": {
        "type": "object",
        "required": ["command", "dry_run", "root", "files", "notes", "layer", "peft"],
        "properties": {
            "command": {"const": "new"},
            "dry_run": {"type": "boolean"},
            "files": FILES,
            "notes": STRINGS,
            "layer": {
                "type": "object",
                "required": ["target", "strategy", "reason", "verdicts", "dora", "weight", "input", "layer_class"],
                "properties": {
                    "verdicts": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["strategy", "matched", "relative_error", "note"]},
                    },
                },
            },
            "peft": {"type": "object", "required": ["mode", "version", "versions", "api"]},
        },
    },
    "update": {
        "type": "object",
        "required": ["command", "dry_run", "root", "files", "notes", "layer", "peft"],
        "properties": {"command": {"const": "update"}, "files": FILES, "notes": STRINGS},
    },
    "remove": {
        "type": "object",
        "required": ["command", "files", "notes"],
        "properties": {"command": {"const": "remove"}, "files": FILES},
    },
    "check": {
        "type": "object",
        "required": ["command", "stale", "updated", "files", "notes", "error"],
        "properties": {"command": {"const": "check"}, "stale": STRINGS, "files": FILES},
    },
    "inspect": {
        "type": "object",
        "required": ["command", "target", "parameters", "ctor_args"],
        "properties": {"command": {"const": "inspect"}, "parameters": {"type": "array"}},
    },
    "scan": {
        "type": "object",
        "required": ["command", "classes"],
        "properties": {
            "command": {"const": "scan"},
            "classes": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": [
                        "qualified_name",
                        "instances",
                        "example",
                        "weights",
                        "handled_by",
                        "command",
                        "why_not",
                    ],
                    "properties": {"instances": {"type": "integer", "minimum": 1}, "weights": {"type": "object"}},
                },
            },
        },
    },
    "error": {
        "type": "object",
        "required": ["command", "error"],
        "properties": {"command": {"type": "string"}, "error": {"type": "string"}},
        "additionalProperties": False,
    },
}


def run_json(capsys, *arguments: str) -> tuple[int, dict]:
    code = main([*arguments, "--json"])
    captured = capsys.readouterr()
    assert captured.err == ""
    return code, json.loads(captured.out)


def test_new_and_inspect(tmp_path, capsys):
    code, data = run_json(capsys, "new", "torch.nn.Conv1d", "-o", str(tmp_path), "--dry-run")
    assert code == 0
    jsonschema.validate(data, SCHEMAS["new"])
    assert data["layer"]["strategy"] == "conv" and all("diff" in f for f in data["files"])
    code, data = run_json(capsys, "new", "torch.nn.Conv1d", "-o", str(tmp_path))
    assert code == 0 and {f["status"] for f in data["files"]} == {"create"}
    code, data = run_json(capsys, "inspect", "torch.nn.Conv1d")
    jsonschema.validate(data, SCHEMAS["inspect"])
    code, data = run_json(capsys, "scan", "torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Bilinear(2, 3, 4))")
    jsonschema.validate(data, SCHEMAS["scan"])
    assert code == 0 and [c["handled_by"] for c in data["classes"]] == ["lora.Linear", ""]


def test_update_and_its_conflict(tmp_path, capsys):
    assert run_json(capsys, "new", "torch.nn.Conv1d", "-o", str(tmp_path))[0] == 0
    layer = tmp_path / "lora_conv1d.py"
    layer.write_text(layer.read_text().replace("import math\n", "import math  # mine\n"))
    code, data = run_json(capsys, "update", str(layer), "--arg", "out_channels=5")
    jsonschema.validate(data, SCHEMAS["update"])
    assert code == 0 and data["notes"] == ["merged your edits into lora_conv1d.py"]
    code, data = run_json(capsys, "update", str(tmp_path / "lora_nothing.py"))
    assert code == 2 and "no generation record" in data["error"]


def test_check_fresh_and_stale(tmp_path, capsys):
    shutil.copytree(REPO / "generated_examples", tmp_path / "examples")
    code, data = run_json(capsys, "check", str(tmp_path / "examples"))
    jsonschema.validate(data, SCHEMAS["check"])
    assert code == 0 and data["stale"] == [] and data["error"] is None
    layer = tmp_path / "examples" / "bilinear" / "lora_bilinear.py"
    layer.write_text(layer.read_text() + "# edited\n")
    code, data = run_json(capsys, "check", str(tmp_path / "examples"))
    jsonschema.validate(data, SCHEMAS["check"])
    assert code == 1 and data["stale"] == ["bilinear"] and "--update" in data["error"]
    assert "-# edited" in data["files"][0]["diff"]


def test_patch_new_and_remove(pristine, tmp_path, capsys):
    checkout = tmp_path / "peft"
    shutil.copytree(pristine, checkout)
    code, data = run_json(capsys, "new", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout))
    jsonschema.validate(data, SCHEMAS["new"])
    assert code == 0 and data["peft"]["mode"] == "patch"
    code, data = run_json(capsys, "remove", "torch.nn.ConvTranspose2d", "--peft-checkout", str(checkout))
    jsonschema.validate(data, SCHEMAS["remove"])
    assert code == 0 and "delete" in {f["status"] for f in data["files"]}


@pytest.mark.parametrize(
    "arguments, code",
    [
        (["new", "nosuchpkg_xyz.Layer"], 2),
        (["remove", "torch.nn.Linear", "--peft-checkout", "/nowhere"], 2),
        (["inspect", "torch.nn.Linear", "--arg", "x"], 2),
        (["check", "/nowhere"], 2),
        (["scan", "nosuchpkg_xyz.build()"], 2),
    ],
)
def test_errors_are_json_with_the_same_exit_codes(arguments, code, capsys):
    got, data = run_json(capsys, *arguments)
    assert got == code
    jsonschema.validate(data, SCHEMAS["error"])


def run_on_terminal(arguments: list[str], cwd: Path, **env: str) -> str:
    """Run the CLI with stdout and stderr on a pseudo-terminal; what it wrote there."""
    controller, terminal = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | env
    process = subprocess.Popen(
        [sys.executable, "-m", "lora_scaffold", *arguments],
        stdout=terminal,
        stderr=terminal,
        cwd=cwd,
        env=environment,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    os.close(controller)
    return b"".join(chunks).decode()


def test_colour_and_progress_on_a_terminal_only(tmp_path):
    shown = run_on_terminal(["new", "torch.nn.Linear", "-o", "a"], tmp_path)
    assert "\033[32mcreate" in shown and "probing how LoRA applies" in shown
    plain = run_on_terminal(["new", "torch.nn.Linear", "-o", "b"], tmp_path, NO_COLOR="1")
    assert "\033[" not in plain and "create" in plain
    piped = subprocess.run(
        [sys.executable, "-m", "lora_scaffold", "new", "torch.nn.Linear", "-o", "c"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "\033[" not in piped.stdout and "probing" not in piped.stderr and "create" in piped.stdout
