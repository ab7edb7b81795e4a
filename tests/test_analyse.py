import dataclasses

import pytest

from lora_scaffold import strategies
from lora_scaffold.analyse import analyse
from lora_scaffold.errors import AnalysisError
from lora_scaffold.introspect import introspect
from lora_scaffold.names import layer_names
from lora_scaffold.request import Options
from lora_scaffold.resolve import resolve_target


def plan_for(target, args=None, **options):
    spec = introspect(resolve_target(target), {k: repr(v) for k, v in (args or {}).items()})
    return analyse(spec, Options(**options))


@pytest.mark.parametrize(
    "target, args, options, strategy, fan_in_fan_out",
    [
        ("torch.nn.Linear", {}, {}, "linear", False),
        ("scaffold_targets.PlainLinear", {"in_features": 5, "out_features": 7}, {}, "linear", False),
        ("transformers.pytorch_utils.Conv1D", {}, {}, "linear", True),
        ("torch.nn.Conv1d", {}, {}, "conv", False),
        ("torch.nn.Conv2d", {"groups": 2, "dilation": 2, "stride": 2, "padding": 1}, {}, "conv", False),
        ("torch.nn.Conv2d", {"padding": 1, "padding_mode": "reflect"}, {}, "conv", False),
        ("torch.nn.Conv3d", {}, {}, "conv", False),
        ("torch.nn.Embedding", {"padding_idx": 0}, {}, "embedding", False),
        ("torch.nn.ConvTranspose2d", {}, {}, "conv_transpose", False),
        ("torch.nn.ConvTranspose1d", {"stride": 2, "padding": 1, "output_padding": 1}, {}, "conv_transpose", False),
        ("torch.nn.ConvTranspose3d", {"groups": 2, "dilation": 2}, {}, "conv_transpose", False),
        ("torch.nn.Bilinear", {}, {}, "delta", False),
        ("torch.nn.EmbeddingBag", {}, {}, "delta", False),
        ("torch.nn.GRU", {"input_size": 6, "hidden_size": 8}, {"weight": "weight_ih_l0"}, "delta", False),
        ("scaffold_targets.SquaredConv", {}, {}, "delta", False),
        ("scaffold_targets.ScaledConv", {}, {}, "delta", False),
        ("scaffold_targets.NormalizedLinear", {}, {}, "delta", False),
        ("scaffold_targets.NestedConv", {}, {}, "delta", False),
        ("scaffold_targets.RequiredArgs", {"width": 3, "depth": 4}, {}, "linear", False),
        ("scaffold_targets.RequiredArgs", {"width": 3, "depth": 4, "scale": 2.0}, {}, "delta", False),
        ("torch.nn.Linear", {}, {"strategy": "delta"}, "delta", False),
        ("scaffold_targets.CountingLinear", {}, {}, "reuse", False),
        ("scaffold_targets.TracedConv2d", {"padding": 1}, {}, "reuse", False),
        ("scaffold_targets.TracedConv2d", {"dilation": 2}, {}, "conv", False),
        ("scaffold_targets.TracedConv2d", {"padding": 1, "padding_mode": "reflect"}, {}, "conv", False),
        ("scaffold_targets.OffsetLinear", {}, {}, "linear", False),
        ("scaffold_targets.CountingLinear", {}, {"strategy": "linear"}, "linear", False),
        ("torch.nn.Linear", {}, {"strategy": "stub"}, "stub", False),
        ("scaffold_targets.GainLinear", {}, {}, "delta", False),
        ("scaffold_targets.GainConv", {}, {}, "delta", False),
        ("scaffold_targets.ReluLinear", {}, {}, "delta", False),
        ("scaffold_targets.DropoutLinear", {}, {}, "reuse", False),
        ("scaffold_targets.PairOutputLinear", {}, {}, "delta", False),
    ],
)
def test_auto_picks_a_factored_path_only_where_the_probe_proves_it(target, args, options, strategy, fan_in_fan_out):
    plan = plan_for(target, args, **options)
    assert (plan.decision.strategy, plan.decision.fan_in_fan_out) == (strategy, fan_in_fan_out)
    assert plan.decision.reason


@pytest.mark.parametrize(
    "target, args, blocker",
    [
        ("torch.nn.Linear", {}, ""),
        ("transformers.pytorch_utils.Conv1D", {}, ""),
        ("scaffold_targets.PlainLinear", {"in_features": 5, "out_features": 7}, ""),
        ("torch.nn.Conv2d", {"stride": 2, "padding": 1, "dilation": 2}, ""),
        ("scaffold_targets.CountingLinear", {}, ""),
        ("torch.nn.Conv2d", {"in_channels": 4, "out_channels": 6, "groups": 2}, "groups=2"),
        ("torch.nn.Conv2d", {"padding": 1, "padding_mode": "reflect"}, "conv map plus the bias"),
        ("scaffold_targets.OffsetLinear", {}, "linear map plus the bias, and OffsetLinear's differs by"),
        ("scaffold_targets.BiaslessLinear", {}, "BiaslessLinear has no bias tensor"),
        ("scaffold_targets.IgnoresBias", {}, "linear map plus the bias, and IgnoresBias's differs by"),
        ("scaffold_targets.NestedConv", {}, "the probe found neither"),
        ("torch.nn.ConvTranspose2d", {}, "transposed"),
        ("torch.nn.Embedding", {}, "embeddings"),
    ],
)
def test_dora_is_offered_only_where_peft_dora_math_holds(target, args, blocker):
    plan = plan_for(target, args)
    assert blocker in plan.decision.dora_blocker if blocker else plan.decision.dora_blocker == ""


def test_reuse_needs_the_parent_forward():
    with pytest.raises(AnalysisError, match="reuse: needs the parent's forward"):
        plan_for("scaffold_targets.OffsetLinear", strategy="reuse")


def test_reason_reports_the_probe_and_the_fallback():
    plan = plan_for("scaffold_targets.SquaredConv")
    assert plan.decision.reason.startswith("auto: no factored path is exact (conv: differs by")
    assert [v.strategy.name for v in plan.decision.verdicts] == ["reuse", "conv", "conv_transpose", "delta"]
    assert [v.matched for v in plan.decision.verdicts] == [False, False, False, True]


def test_grouped_conv_rank_is_divisible_by_groups():
    plan = plan_for("torch.nn.Conv2d", {"in_channels": 6, "out_channels": 9, "groups": 3})
    assert plan.decision.groups == 3 and plan.decision.test_rank % 3 == 0


def test_inputs_are_inferred_from_weight_and_forward():
    assert plan_for("torch.nn.Conv2d").call.example_input == "torch.randn(2, 4, 6, 6)"
    assert plan_for("torch.nn.Embedding").call.example_input == "torch.randint(0, 20, (2, 3))"
    assert plan_for("torch.nn.Bilinear").call.example_input == "(torch.randn(2, 5), torch.randn(2, 7))"
    assert plan_for("transformers.pytorch_utils.Conv1D").call.example_input == "torch.randn(2, 8)"


def test_example_input_is_used_as_given():
    plan = plan_for("torch.nn.Conv2d", example_input="torch.randn(1, 4, 11, 11)")
    assert plan.call.example_input == "torch.randn(1, 4, 11, 11)" and not plan.call.input_inferred


def test_a_given_example_input_that_fails_is_reported_as_such():
    with pytest.raises(AnalysisError, match=r"Conv2d fails on --example-input torch.randn\(2, 3\): RuntimeError: Exp"):
        plan_for("torch.nn.Conv2d", example_input="torch.randn(2, 3)")


def test_several_weights_need_a_choice():
    with pytest.raises(AnalysisError, match=r"several weights \(up \[6, 4\], down \[4, 6\]\).*--weight"):
        plan_for("scaffold_targets.TwoWeights")
    assert plan_for("scaffold_targets.TwoWeights", weight="down").weight.name == "down"


def test_masked_outputs_neither_scale_nor_hide_the_weights_effect():
    # -inf entries made the effect inf - inf and the scale inf: "barely depends ... by 0e+00" before.
    assert plan_for("scaffold_targets.MaskedOutput").decision.strategy == "delta"


def test_nested_weight_can_be_named():
    plan = plan_for("scaffold_targets.NestedConv", weight="conv.weight")
    assert plan.weight.name == "conv.weight" and plan.weight.bias_name is None


@pytest.mark.parametrize(
    "target, options, message",
    [
        ("scaffold_targets.OnlyBuffers", {}, "only buffers"),
        ("scaffold_targets.NoParameters", {}, "no parameters"),
        ("torch.nn.LayerNorm", {}, "no weight with 2 or more dimensions"),
        ("torch.nn.Linear", {"weight": "kernel"}, "has no parameter 'kernel'; its parameters: weight, bias"),
        ("scaffold_targets.IgnoresWeight", {}, "does not change with 'weight'"),
        ("scaffold_targets.RoundsAwayWeight", {}, "does not change with 'weight'"),
        ("scaffold_targets.SquaredConv", {"strategy": "conv"}, "--strategy conv does not fit"),
        ("torch.nn.Linear", {"strategy": "embedding"}, "--strategy embedding does not fit"),
        ("torch.nn.Linear", {"strategy": "reuse"}, "reuse: needs a subclass of nn.Linear"),
        ("scaffold_targets.NormalizedLinear", {"strategy": "reuse"}, "--strategy reuse does not fit"),
        ("torch.nn.Linear", {"name": "my/layer"}, "must be a Python identifier"),
        ("torch.nn.Linear", {"name": "class"}, "must be a Python identifier"),
    ],
)
def test_bad_choices_are_explained(target, options, message):
    args = {"normalized_shape": 4} if target.endswith("LayerNorm") else {}
    with pytest.raises(AnalysisError, match=message):
        plan_for(target, args, **options)


@pytest.mark.parametrize(
    "class_name, name, expected",
    [
        ("MyConv", None, ("LoraMyConv", "lora_my_conv")),
        ("ConvTranspose2d", None, ("LoraConvTranspose2d", "lora_conv_transpose2d")),
        ("Conv1D", None, ("LoraConv1D", "lora_conv1d")),
        ("GRU", None, ("LoraGRU", "lora_gru")),
        ("Conv1D", "gpt2_conv", ("LoraGpt2Conv", "lora_gpt2_conv")),
        ("Config", None, ("LoraConfigLayer", "lora_config_layer")),
        ("Layer", None, ("LoraLayerLayer", "lora_layer_layer")),
    ],
)
def test_layer_names(class_name, name, expected):
    assert layer_names(class_name, name) == expected


def test_every_choice_names_strategies_of_the_registry():
    assert strategies.CHOICES[0] == "auto"
    for choice in strategies.CHOICES[1:]:
        assert strategies.asked_for(choice), choice
    assert {s.name for s in strategies.asked_for("conv")} == {"conv", "conv_transpose"}
    assert [s.name for s in strategies.REGISTRY if s.fallback] == ["delta"]


def test_forced_conv_covers_transposed_convolutions():
    assert plan_for("torch.nn.ConvTranspose2d", strategy="conv").decision.strategy == "conv_transpose"


def test_a_forward_random_in_training_is_compared_in_eval_mode():
    plan = plan_for("scaffold_targets.DropoutLinear")
    assert plan.decision.eval_only == "its forward is random in training mode"
    assert plan.decision.reason.endswith("(compared in eval mode: its forward is random in training mode)")
    batch_norm = plan_for(
        "torch.nn.BatchNorm1d", {"num_features": 4}, weight="weight", example_input="torch.randn(3, 4)"
    )
    assert batch_norm.decision.eval_only == "its forward changes the module's state in training mode"


def test_a_forward_random_in_eval_mode_is_refused():
    with pytest.raises(AnalysisError, match="NoisyLinear cannot be checked: its forward gives different outputs"):
        plan_for("scaffold_targets.NoisyLinear")


def test_parametrization_pieces_stand_behind_the_weight_they_compute_and_only_they():
    from lora_scaffold.introspect import TensorInfo
    from lora_scaffold.weight_choice import choose_weight

    spec = introspect(resolve_target("scaffold_targets.WeightNormLinear"), {})
    assert choose_weight(spec, None) == TensorInfo("weight", (7, 5), "float32", True, computed=True)
    named_original = dataclasses.replace(
        spec, parameters=(TensorInfo("original_proj.weight", (4, 3), "float32", True),)
    )
    assert choose_weight(named_original, None).name == "original_proj.weight"
