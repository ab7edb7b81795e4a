import dataclasses
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import jinja2
import pytest
import yaml

from lora_scaffold import strategies
from lora_scaffold.analyse import analyse
from lora_scaffold.cli import main
from lora_scaffold.context import LayerContext
from lora_scaffold.context import kind_of as context_kind
from lora_scaffold.errors import RenderError
from lora_scaffold.introspect import introspect
from lora_scaffold.peft_release import PATCH, PLUGIN, PeftRelease
from lora_scaffold.render import layer_context, refusal_message, render, render_templates, template_dir
from lora_scaffold.request import Options
from lora_scaffold.resolve import resolve_target
from lora_scaffold.workflow import plan_layer, request_from_model


LATEST = PeftRelease(PLUGIN, (0, 21, 2))
KWARGS_017 = PeftRelease(PLUGIN, (0, 17, 1))
NO_VARIANTS = PeftRelease(PLUGIN, (0, 15, 2))
OLDEST = PeftRelease(PLUGIN, (0, 13, 2))


REPO = Path(__file__).resolve().parent.parent
PEFT_RUFF = Path(__file__).parent / "peft_ruff.toml"

VARIETY = [
    ("torch.nn.Linear", {}, {}),
    ("scaffold_targets.CountingLinear", {}, {}),
    ("torch.nn.ConvTranspose1d", {"groups": 2}, {}),
    ("transformers.pytorch_utils.Conv1D", {}, {"name": "gpt2_conv1d"}),
    ("torch.nn.Conv2d", {"groups": 2}, {}),
    ("torch.nn.Embedding", {}, {}),
    ("torch.nn.Bilinear", {}, {}),
    ("scaffold_targets.NestedConv", {}, {"weight": "conv.weight"}),
    ("torch.nn.Linear", {}, {"strategy": "stub", "name": "linear_stub"}),
    ("mypkg.Int8WeightOnlyLinear", {}, {}),
    ("scaffold_targets.Float8Linear", {}, {}),
]


def plan_for(target, args, options):
    spec = introspect(resolve_target(target), {k: repr(v) for k, v in args.items()})
    return analyse(spec, Options(**options))


@pytest.fixture(scope="module")
def rendered_variety():
    """Every case as plugin output for peft >= 0.19, plus both modes of the older API for a few."""
    plans = [plan_for(*case) for case in VARIETY]
    # Targets taken from a model: their tests record the call the model makes (GPT-2's attention takes keywords).
    gpt2 = "transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))"
    request = request_from_model(gpt2, "transformer.h.0.attn", None, weight="c_attn.weight")
    plans.append(plan_layer(request)[1])
    versions = [(0, 13, 2), (0, 15, 2), (0, 17, 1), (0, 19, 0), (0, 20, 0)]
    older = [render(plan, PeftRelease(mode, v)) for plan in plans[2:5] for mode in (PLUGIN, PATCH) for v in versions]
    patch = [render(plan, PeftRelease(PATCH, LATEST.version)) for plan in plans]
    return [render(plan, LATEST) for plan in plans] + patch + older


def test_committed_examples_match_a_fresh_render(capsys):
    code = main(["check", str(REPO / "generated_examples")])
    captured = capsys.readouterr()
    assert code == 0, f"{captured.out}\n{captured.err}"


def test_check_reports_stale_examples_with_a_diff_and_the_refresh_command(tmp_path, capsys):
    shutil.copytree(REPO / "generated_examples", tmp_path / "examples")
    stale = tmp_path / "examples" / "mypkg_myconv" / "lora_my_conv.py"
    stale.write_text(stale.read_text() + "# edited\n", encoding="utf-8")
    assert main(["check", str(tmp_path / "examples")]) == 1
    captured = capsys.readouterr()
    assert "-# edited" in captured.out
    assert f"lora-scaffold check {tmp_path / 'examples'} --update" in captured.err
    assert main(["check", str(tmp_path / "examples"), "--update"]) == 0
    assert main(["check", str(tmp_path / "examples")]) == 0


def test_rendering_is_deterministic():
    plan = plan_for("torch.nn.Conv2d", {}, {})
    assert render(plan, LATEST) == render(plan_for("torch.nn.Conv2d", {}, {}), LATEST)


def test_templates_refuse_missing_answers():
    answers = layer_context(plan_for("torch.nn.Linear", {}, {}), LATEST).answers()
    del answers["weight_name"]
    with pytest.raises(jinja2.UndefinedError, match="weight_name"):
        render_templates(answers)


def test_the_context_is_copier_yml_question_for_question():
    declared = yaml.safe_load((template_dir() / "copier.yml").read_text())
    questions = {key: spec for key, spec in declared.items() if not key.startswith("_")}
    fields = {field.name: field for field in dataclasses.fields(LayerContext)}
    assert set(fields) == set(questions)
    # A default where copier has one (an answer only some partials read), and none where copier has none.
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        assert (default is not dataclasses.MISSING) == ("default" in questions[name]), name
        if "default" in questions[name]:
            expected = questions[name]["default"]
            assert default == (tuple(expected) if isinstance(expected, list) else expected), name


def test_the_context_is_frozen():
    context = layer_context(plan_for("torch.nn.Linear", {}, {}), LATEST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.layer_class = "Other"  # type: ignore[misc]


def test_every_text_answer_is_typed_by_what_it_becomes_in_code():
    hints = typing.get_type_hints(LayerContext, include_extras=True)
    untyped = [name for name, hint in hints.items() if "str" in str(hint) and context_kind(hint) is None]
    assert not untyped


@pytest.mark.parametrize(
    ("answer", "value"),
    [
        ("layer_class", "Lora Layer"),
        ("eval_only", "ends the comment\nimport os"),
        ("peft_versions", 'peft 0.21"""; import os; """'),
        ("weight_name", "'weight'); import os; ('"),
        ("refusal_cases", ("pytest.param({}, 'x', id='a')", "pytest.param(")),
        ("imports", "from x import"),
        ("strategy_answers", {"conv_class": "nn.Conv2d("}),
    ],
)
def test_an_answer_that_is_not_what_its_type_says_is_refused_naming_it(answer, value):
    context = layer_context(plan_for("torch.nn.Linear", {}, {}), LATEST)
    with pytest.raises(RenderError, match=f"answer {answer} should be"):
        dataclasses.replace(context, **{answer: value})


def test_copier_renders_the_same_files(tmp_path):
    copier = pytest.importorskip("copier")
    plan = plan_for("torch.nn.Embedding", {}, {})
    context = layer_context(plan, LATEST).answers()
    copier.run_copy(str(template_dir()), tmp_path, data=context, defaults=True, quiet=True, unsafe=True)
    written = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*.py")}
    assert written == {f.path: f.text for f in render(plan, LATEST)}


def test_generated_code_passes_peft_ruff_settings(rendered_variety, tmp_path):
    for index, files in enumerate(rendered_variety):
        folder = tmp_path / f"case{index}"
        folder.mkdir()
        for generated in files:
            (folder / generated.path).write_text(generated.text)
    ruff = [sys.executable, "-m", "ruff"]
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        for folder in sorted(tmp_path.iterdir()):
            result = subprocess.run(
                [*ruff, *command, "--config", str(PEFT_RUFF), "."], cwd=folder, capture_output=True, text=True
            )
            assert result.returncode == 0, f"{folder.name}: {result.stdout}{result.stderr}"


def test_generated_lines_fit_peft_line_length(rendered_variety):
    # ruff format never splits a string: the renderer does, for messages and constants it writes.
    for files in rendered_variety:
        for generated in files:
            long = [line for line in generated.text.splitlines() if len(line) > 119]
            assert not long, (generated.path, long)


@pytest.mark.parametrize("why", ["short", 'a reason with "quotes", {braces} and \\ ' + "and words " * 12])
def test_a_refusal_message_is_code_whatever_its_reason(why):
    lines = refusal_message("lora_bias", why)
    assert all(len(line) + 16 <= 119 for line in lines)
    message = eval("(" + "\n".join(lines) + ")", {"self": object(), "type": type})  # noqa: S307 - our own render
    assert message == f"lora.object does not support lora_bias=True: {why}."


def test_layer_file_says_what_and_for_which_peft_without_the_probe_report():
    layer = render(plan_for("scaffold_targets.SquaredConv", {}, {}), LATEST)[0]
    assert layer.path == "lora_squared_conv.py"
    assert layer.text.startswith('"""LoRA for `scaffold_targets.SquaredConv`, written by lora-scaffold')
    assert "for peft >= 0.21." in layer.text and "relative error" not in layer.text
    docstrings = [line for line in layer.text.splitlines() if not line.lstrip().startswith(('f"', "VARIANT_SUPPORT"))]
    assert max(len(line) for line in docstrings) <= 119


def test_patch_mode_has_peft_license_header_and_no_plugin_parts():
    layer, tests = render(plan_for("torch.nn.Bilinear", {}, {}), PeftRelease(PATCH, (0, 21, 2)))
    for text in (layer.text, tests.text):
        assert text.startswith("# Copyright 2026-present the HuggingFace Inc. team.")
    assert "def register(" not in layer.text and "lora-scaffold" not in layer.text


@pytest.mark.parametrize(
    "version, present, absent",
    [
        ((0, 21, 2), ["PeftWarning", "super().resolve_lora_variant"], ["hasattr", "UNTAGGED", "_variant_for"]),
        ((0, 19, 0), ['"use_bdlora"', "_variant_for"], ["hasattr", "super().resolve_lora_variant"]),
        (
            (0, 17, 1),
            ["SimpleNamespace", "DoraLinearVariant", "factor.view(1, -1)", "self.use_rslora = {}"],
            ["hasattr", "self.lora_bias = {}"],
        ),
        ((0, 13, 2), ["def _cast_input_dtype", "self.lora_bias = {}"], ["hasattr", "PeftWarning", "Variant"]),
    ],
)
def test_version_differences_are_settled_at_generation_time(version, present, absent):
    layer = render(plan_for("transformers.pytorch_utils.Conv1D", {}, {}), PeftRelease(PATCH, version))[0].text
    for text in present:
        assert text in layer, text
    for text in absent:
        assert text not in layer, text


def test_no_strategy_is_named_outside_its_own_files():
    """A strategy's details live in its module and its partials (its answers ride the plan unread): no other code
    or template tests for a strategy by name."""
    names = {strategy.name for strategy in strategies.REGISTRY}
    package = Path(strategies.__file__).parent.parent
    for path in package.rglob("*.py"):
        if "strategies" not in path.relative_to(package).parts:
            text = path.read_text()
            assert not [name for name in names if f'"{name}"' in text or f"'{name}'" in text], path
    own = {strategy.partial for strategy in strategies.REGISTRY}
    for path in template_dir().rglob("*.jinja"):
        if path.relative_to(template_dir()).as_posix() not in own:
            assert not re.search(r"\bstrategy\s*(==|!=|in\b)", path.read_text()), path


def test_no_empty_tables_or_dead_loops():
    layer = render(plan_for("torch.nn.Conv2d", {}, {}), LATEST)[0].text
    assert "UNSUPPORTED_OPTIONS" not in layer and "VARIANTS = {(): None}" not in layer
    assert "for option, reason in" not in layer


def test_peft_versions_covered_by_one_render():
    assert LATEST.versions == "peft >= 0.21"
    assert KWARGS_017.versions == "peft 0.17"
    assert PeftRelease(PLUGIN, (0, 19, 3)).versions == "peft 0.19"
    assert OLDEST.versions == "peft 0.13"


def test_plan_holds_plain_values_only():
    plan = plan_for("torch.nn.Linear", {}, {})
    plain = (str, int, float, bool, type(None), tuple)
    for part in dataclasses.fields(plan):
        record = getattr(plan, part.name)
        assert dataclasses.is_dataclass(record), part.name
        for field in dataclasses.fields(record):
            if field.name != "verdicts":
                assert isinstance(getattr(record, field.name), plain), f"{part.name}.{field.name}"


def test_dora_goes_through_peft_variant_where_offered():
    layer, tests = render(plan_for("torch.nn.Conv2d", {}, {}), LATEST)
    assert "from peft.tuners.lora.variants import DoraConv2dVariant" in layer.text
    assert 'return {(): None, ("use_dora",): DoraConv2dVariant}' in layer.text
    assert "def test_dora_merges_magnitude_times_direction_and_unmerges" in tests.text
    assert '"use_dora": True' not in tests.text


def test_dora_is_refused_with_the_reason_elsewhere():
    layer, tests = render(plan_for("torch.nn.Bilinear", {}, {}), LATEST)
    assert "variants import" not in layer.text and "def lora_variants" not in layer.text
    assert "no DoRA: DoRA rescales a weight acting as a linear map or a convolution" in layer.text
    assert 'pytest.param({"use_dora": True}, "no DoRA", id="use_dora")' in tests.text


def test_peft_without_lora_variants_gets_dora_refused():
    layer, tests = render(plan_for("torch.nn.Linear", {}, {}), NO_VARIANTS)
    assert "variants import" not in layer.text
    assert "which arrived in peft 0.16" in layer.text
    assert 'pytest.param({"use_dora": True}, "no DoRA", id="use_dora")' in tests.text


def test_lora_bias_cases_only_where_lora_config_has_the_option():
    embedding = plan_for("torch.nn.Embedding", {}, {})
    assert '"lora_bias": True' in render(embedding, LATEST)[1].text
    assert "lora_bias" not in render(embedding, OLDEST)[1].text


def test_a_render_that_does_not_parse_is_a_bug_and_nothing_is_written(tmp_path):
    from lora_scaffold.errors import RenderError
    from lora_scaffold.files import GeneratedFile
    from lora_scaffold.render import parsed

    with pytest.raises(RenderError, match="does not parse .* This is a bug: please report it") as error:
        parsed(GeneratedFile("lora_x.py", "def broken(:\n"))
    assert error.value.exit_code == 1
