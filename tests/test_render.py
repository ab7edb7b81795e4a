import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from lora_scaffold.analyse import Options, analyse
from lora_scaffold.cli import main
from lora_scaffold.introspect import introspect
from lora_scaffold.peft_api import KWARGS_API
from lora_scaffold.render import PATCH, PLUGIN, render, render_templates, template_context, template_dir
from lora_scaffold.resolve import resolve_target


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
]


def plan_for(target, args, options):
    spec = introspect(resolve_target(target), {k: repr(v) for k, v in args.items()})
    return analyse(spec, Options(**options))


@pytest.fixture(scope="module")
def rendered_variety():
    """Every case as plugin output for peft >= 0.19, plus both modes of the older API for a few."""
    plans = [plan_for(*case) for case in VARIETY]
    older = [render(plan, mode, KWARGS_API) for plan in plans[2:5] for mode in (PLUGIN, PATCH)]
    without_variants = [render(plans[0], PLUGIN, KWARGS_API, lora_variants=False)]
    return [render(plan) for plan in plans] + [render(plan, PATCH) for plan in plans[:2]] + older + without_variants


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
    assert render(plan) == render(plan_for("torch.nn.Conv2d", {}, {}))


def test_templates_refuse_missing_answers():
    context = template_context(plan_for("torch.nn.Linear", {}, {}))
    del context["weight_name"]
    with pytest.raises(jinja2.UndefinedError, match="weight_name"):
        render_templates(context)


def test_copier_yml_declares_every_answer_the_renderer_passes():
    declared = yaml.safe_load((template_dir() / "copier.yml").read_text())
    answers = {key for key in declared if not key.startswith("_")}
    assert answers == set(template_context(plan_for("torch.nn.Linear", {}, {})))


def test_copier_renders_the_same_files(tmp_path):
    copier = pytest.importorskip("copier")
    plan = plan_for("torch.nn.Embedding", {}, {})
    context = template_context(plan)
    copier.run_copy(str(template_dir()), tmp_path, data=context, defaults=True, quiet=True, unsafe=True)
    written = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*.py")}
    assert written == {f.path: f.text for f in render(plan)}


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


def test_layer_file_states_strategy_reason_and_regenerate_command():
    layer = render(plan_for("scaffold_targets.SquaredConv", {}, {}))[0]
    assert layer.path == "lora_squared_conv.py"
    assert "#   lora-scaffold new scaffold_targets.SquaredConv\n" in layer.text
    assert "Strategy: delta. Auto: no factored path is exact" in layer.text


def test_peft_builtin_override_is_noted():
    layer = render(plan_for("torch.nn.Linear", {}, {}))[0]
    assert "PEFT has a built-in layer for this type (`peft.tuners.lora.Linear`)" in layer.text


def test_plan_holds_plain_values_only():
    plan = plan_for("torch.nn.Linear", {}, {})
    plain = (str, int, float, bool, type(None), tuple)
    for field in dataclasses.fields(plan):
        value = getattr(plan, field.name)
        if field.name == "probes":
            continue
        assert isinstance(value, plain), field.name


def test_dora_goes_through_peft_variant_where_offered():
    layer, tests = render(plan_for("torch.nn.Conv2d", {}, {}))
    assert "from peft.tuners.lora.variants import DoraConv2dVariant" in layer.text
    assert 'VARIANTS = {(): None, ("use_dora",): DoraConv2dVariant}' in layer.text
    assert "def test_dora_merges_magnitude_times_direction_and_unmerges" in tests.text
    assert '"use_dora": True' not in tests.text


def test_dora_is_refused_with_the_reason_elsewhere():
    layer, tests = render(plan_for("torch.nn.Bilinear", {}, {}))
    assert "variants import" not in layer.text and "VARIANTS = {(): None}\n" in layer.text
    assert "no DoRA: DoRA rescales a weight acting as a linear map or a convolution" in layer.text
    assert '({"use_dora": True}, "no DoRA")' in tests.text


def test_peft_without_lora_variants_gets_dora_refused():
    layer, tests = render(plan_for("torch.nn.Linear", {}, {}), PLUGIN, KWARGS_API, lora_variants=False)
    assert "variants import" not in layer.text
    assert "which arrived in peft 0.16" in layer.text
    assert '({"use_dora": True}, "no DoRA")' in tests.text
