"""The workflow API, called directly: planned changes and reports, nothing printed, nothing written by itself."""

import json
import shutil
from pathlib import Path

import pytest

from lora_scaffold import workflow
from lora_scaffold.errors import ScaffoldError
from lora_scaffold.peft_release import PLUGIN, PeftRelease
from lora_scaffold.record import GenerationRecord
from lora_scaffold.request import Request


REPO = Path(__file__).resolve().parent.parent


def test_new_plugin_plans_three_files_and_writes_nothing(tmp_path):
    outcome = workflow.new_plugin(Request("torch.nn.Conv1d"), tmp_path / "out")
    assert [(c.path.relative_to(tmp_path / "out").as_posix(), c.status) for c in outcome.changes] == [
        ("lora_conv1d.py", "create"),
        ("test_lora_conv1d.py", "create"),
        (".lora-scaffold/lora_conv1d.json", "create"),
    ]
    assert outcome.report.plan.decision.strategy == "conv" and outcome.report.peft.mode == PLUGIN
    assert not (tmp_path / "out").exists()


def test_record_holds_what_is_needed_to_generate_again(tmp_path):
    request = Request("torch.nn.Conv2d", ("groups=2",), name="grouped")
    workflow.new_plugin(request, tmp_path, peft=PeftRelease(PLUGIN, (0, 17, 1))).apply()
    text = (tmp_path / ".lora-scaffold" / "lora_grouped.json").read_text()
    record = GenerationRecord.from_json(text, "record")
    assert record.request == request
    assert (record.strategy, record.layer_api, record.peft_version) == ("conv", "kwargs", "0.17.1")
    assert record.constructor == {"in_channels": "4", "out_channels": "6", "kernel_size": "3", "groups": "2"}
    assert [(v["strategy"], v["matched"]) for v in record.verdicts] == [("conv", True)]
    assert set(record.files) == {"lora_grouped.py", "test_lora_grouped.py"}
    again = workflow.new_plugin(record.request, tmp_path, peft=PeftRelease(PLUGIN, (0, 17, 1)))
    assert {c.status for c in again.changes} == {"identical"}


def test_a_record_that_is_not_one_is_a_clear_error():
    with pytest.raises(ScaffoldError, match="is not a lora-scaffold generation record"):
        GenerationRecord.from_json("[1, 2]", "x.json")
    with pytest.raises(ScaffoldError, match="record format 7"):
        GenerationRecord.from_json('{"format": 7}', "x.json")


def test_check_examples_finds_the_stale_one(tmp_path):
    shutil.copytree(REPO / "generated_examples", tmp_path / "examples")
    assert workflow.check_examples(tmp_path / "examples")[0] == []
    layer = tmp_path / "examples" / "bilinear" / "lora_bilinear.py"
    layer.write_text(layer.read_text() + "# edited\n")
    stale, outcomes = workflow.check_examples(tmp_path / "examples")
    assert stale == ["bilinear"]
    assert [c.path for outcome in outcomes for c in outcome.changes if c.writes] == [layer]


@pytest.mark.parametrize(
    "manifest, message",
    [
        ({"conv": ["torch.nn.Conv2d"]}, 'should be {"peft": "VERSION"'),
        ({"peft": "0.21.2", "examples": {"../escaped": {"target": "torch.nn.Linear"}}}, "must be a plain folder name"),
        ({"peft": "0.21.2", "examples": {"a": ["torch.nn.Linear"]}}, "example 'a': expected an object"),
        ({"peft": "0.21.2", "examples": {"a": {"target": "torch.nn.Linear", "colour": 1}}}, "unknown option colour"),
        ({"peft": "0.21.2", "examples": {"a": {"target": "torch.nn.Linear", "args": "x=1"}}}, "list of NAME=VALUE"),
        ({"peft": "0.9.0", "examples": {}}, "peft 0.9.0 is too old"),
    ],
)
def test_bad_manifests_are_explained_naming_the_example(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ScaffoldError, match=message.replace("(", r"\(").replace("[", r"\[")):
        workflow.check_examples(tmp_path)
