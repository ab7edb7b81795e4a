"""`update`: re-render a generated layer with new options or a newer lora-scaffold, keeping the user's edits."""

import json

import pytest

from lora_scaffold import render
from lora_scaffold.cli import main
from lora_scaffold.merge import merge_file
from lora_scaffold.record import record_path


BASE = "a\nb\nc\nd\ne\n"


def test_merge_takes_both_sides_and_marks_overlaps():
    merged = merge_file("f.py", BASE, "a\nB\nc\nd\ne\n", "a\nb\nc\nd\nE\n")
    assert (merged.text, merged.conflicts) == ("a\nB\nc\nd\nE\n", ())
    assert merge_file("f.py", BASE, BASE, "x\n").text == "x\n"  # unedited: simply replaced
    assert merge_file("f.py", BASE, "mine\n", BASE).text == "mine\n"  # nothing new: yours stays
    clash = merge_file("f.py", BASE, "a\nB\nc\nd\ne\n", "a\nX\nc\nd\ne\n")
    assert [conflict.describe() for conflict in clash.conflicts] == [
        "f.py: line 2 changed both by you and by the new render"
    ]
    assert clash.text == "a\n<<<<<<< yours\nB\n=======\nX\n>>>>>>> lora-scaffold\nc\nd\ne\n"


@pytest.fixture
def generated(tmp_path, monkeypatch):
    """mypkg.MyConv generated into tmp_path/out, as a user would have it."""
    monkeypatch.chdir(tmp_path)
    assert main(["new", "mypkg.MyConv", "-o", "out"]) == 0
    return tmp_path / "out"


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_an_edit_and_a_new_option_merge_cleanly(generated, capsys):
    layer, tests = generated / "lora_my_conv.py", generated / "test_lora_my_conv.py"
    edit(layer, "import math\n", "import math  # kept by update\n")
    assert main(["update", str(layer), "--arg", "out_channels=8"]) == 0
    assert "import math  # kept by update\n" in layer.read_text()
    assert "out_channels=8" in tests.read_text()  # the new option reached the tests
    record = json.loads((generated / record_path("lora_my_conv")).read_text())
    assert record["request"]["args"] == ["out_channels=8"]
    assert "merged your edits" in capsys.readouterr().out
    assert main(["update", str(layer), "--arg", "out_channels=8"]) == 0  # a second run changes nothing
    assert "import math  # kept by update\n" in layer.read_text()


def test_a_newer_template_merges_into_an_edited_file(generated, monkeypatch):
    layer = generated / "lora_my_conv.py"
    edit(layer, "import math\n", "import math  # mine\n")
    rendered = render.render

    def newer(plan, peft):  # a later lora-scaffold whose layer template says something new
        files = rendered(plan, peft)
        return tuple(
            type(f)(f.path, f.text.replace("def merge(", "# new in this version\n    def merge(")) for f in files
        )

    monkeypatch.setattr("lora_scaffold.workflow.render", newer)
    assert main(["update", str(layer)]) == 0
    text = layer.read_text()
    assert "import math  # mine\n" in text and "# new in this version\n    def merge(" in text


def test_overlapping_edits_conflict_and_nothing_is_written(generated, monkeypatch, capsys):
    layer = generated / "lora_my_conv.py"
    edit(layer, "import math\n", "import math  # mine\n")
    before = {path: path.read_bytes() for path in generated.rglob("*") if path.is_file()}
    rendered = render.render
    monkeypatch.setattr(
        "lora_scaffold.workflow.render",
        lambda plan, peft: tuple(
            type(f)(f.path, f.text.replace("import math\n", "import math  # theirs\n")) for f in rendered(plan, peft)
        ),
    )
    assert main(["update", str(layer)]) == 1
    error = capsys.readouterr().err
    assert "lora_my_conv.py: line " in error and "--conflicts=markers" in error
    assert {path: path.read_bytes() for path in generated.rglob("*") if path.is_file()} == before
    assert main(["update", str(layer), "--conflicts=markers"]) == 0
    assert "<<<<<<< yours\nimport math  # mine\n=======\nimport math  # theirs\n>>>>>>> lora-scaffold\n" in (
        layer.read_text()
    )


def test_dry_run_shows_the_diff_and_writes_nothing(generated, capsys):
    tests = generated / "test_lora_my_conv.py"
    before = tests.read_text()
    capsys.readouterr()
    assert main(["update", str(generated / "lora_my_conv.py"), "--arg", "out_channels=8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "+" in out and "out_channels=8" in out
    assert tests.read_text() == before


def test_update_explains_what_it_cannot_do(tmp_path, generated, capsys):
    stray = tmp_path / "lora_nothing.py"
    stray.write_text("x = 1\n")
    assert main(["update", str(stray)]) == 2
    assert "no generation record" in capsys.readouterr().err
    assert main(["update", str(generated / "lora_my_conv.py"), "--name", "other"]) == 2
    assert "lora_other" in capsys.readouterr().err


def test_patch_mode_update_merges_into_the_checkout_and_keeps_the_wiring(checkout):
    assert main(["new", "mypkg.MyConv", "--peft-checkout", str(checkout)]) == 0
    layer = checkout / "src/peft/tuners/lora/lora_my_conv.py"
    tests = checkout / "tests/test_lora_my_conv.py"
    edit(layer, "import math\n", "import math  # mine\n")
    dispatch_before = (checkout / "src/peft/tuners/lora/layer.py").read_text()
    assert main(["update", "mypkg.MyConv", "--arg", "out_channels=8", "--peft-checkout", str(checkout)]) == 0
    assert "import math  # mine\n" in layer.read_text()
    assert "out_channels=8" in tests.read_text()
    assert (checkout / "src/peft/tuners/lora/layer.py").read_text() == dispatch_before
    assert main(["remove", "mypkg.MyConv", "--peft-checkout", str(checkout), "--force"]) == 0
    assert not layer.exists()
