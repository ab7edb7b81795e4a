import subprocess
import sys

import pytest
import torch
from conftest import REPO

from lora_scaffold.constructor import parse_arg_overrides
from lora_scaffold.errors import TargetError
from lora_scaffold.introspect import introspect
from lora_scaffold.resolve import resolve_target
from lora_scaffold.uninitialised import build_noting_empty


def spec_of(target, **overrides):
    return introspect(resolve_target(target), {k: repr(v) for k, v in overrides.items()})


def test_required_arguments_with_common_names_are_guessed():
    spec = spec_of("torch.nn.Conv2d")
    assert dict(spec.ctor_args) == {"in_channels": "4", "out_channels": "6", "kernel_size": "3"}
    assert spec.guessed_args == ("in_channels", "out_channels", "kernel_size")


def test_overrides_win_and_are_kept_in_signature_order():
    spec = spec_of("torch.nn.Conv2d", groups=2, in_channels=8)
    assert [name for name, _ in spec.ctor_args] == ["in_channels", "out_channels", "kernel_size", "groups"]
    assert dict(spec.ctor_args)["in_channels"] == "8"


def test_parameters_buffers_and_peft_attributes_are_described():
    spec = spec_of("torch.nn.BatchNorm2d", num_features=3)
    assert [(p.name, p.shape, p.dtype) for p in spec.parameters] == [
        ("weight", (3,), "float32"),
        ("bias", (3,), "float32"),
    ]
    assert {b.name for b in spec.buffers} == {"running_mean", "running_var", "num_batches_tracked"}
    conv = spec_of("torch.nn.Conv2d")
    assert dict(conv.attributes)["stride"] == "(1, 1)"
    assert conv.forward_arity == 1


def test_nested_parameter_names_are_kept():
    spec = spec_of("scaffold_targets.NestedConv")
    assert [p.name for p in spec.parameters] == ["gate", "conv.weight", "conv.bias"]
    assert spec.parameter("conv.weight").shape == (5, 3, 3, 3)


def test_forward_arity_counts_required_inputs():
    assert spec_of("torch.nn.Bilinear").forward_arity == 2


def test_huge_defaults_are_inspected_on_the_meta_device_and_scaled_down():
    spec = spec_of("scaffold_targets.HugeEmbedding")  # built on the meta device: a CPU build would take 1.6 GB
    assert spec.scaled_args == (("num_embeddings", "50000", "16"), ("embedding_dim", "8192", "16"))
    assert dict(spec.ctor_args) == {"num_embeddings": "16", "embedding_dim": "16"}
    assert spec.parameter("weight").shape == (16, 16)


def test_huge_legacy_tensors_are_not_filled_on_the_cpu():
    spec = spec_of("scaffold_targets.HugeLegacyLinear")  # the in-place init would touch 1.6 GB on the CPU
    assert spec.parameter("weight").shape == (16, 16)


def test_small_targets_are_built_on_the_cpu_without_importing_torch_dynamo():
    # torch's meta-device factories import torch._dynamo: a second of start-up for every `new`.
    script = (
        "import sys; from test_introspect import spec_of; spec_of('torch.nn.Conv2d', in_channels=4, "
        "out_channels=6, kernel_size=3); assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_parameters_left_torch_empty_are_found_and_filled_when_built():
    spec = spec_of("scaffold_targets.EmptyInitExperts")
    assert spec.uninitialised == ("weight",)  # `scale` is empty too, but nn.init.ones_ fills it
    assert spec_of("torch.nn.Linear", in_features=4, out_features=3).uninitialised == ()
    first, second = spec.build().weight, spec.build().weight
    assert torch.equal(first, second) and 0.01 < first.std() < 0.04


def test_an_integer_parameter_left_empty_is_not_drawn_from_a_normal():
    """compressed-tensors leaves its symmetric zero point `torch.empty` (int8): no normal draw fits it, and the
    model's own forward never reads it."""

    def build():
        module = torch.nn.Linear(4, 3)
        module.zero_point = torch.nn.Parameter(torch.empty(3, dtype=torch.int8), requires_grad=False)
        return module

    assert build_noting_empty(build)[1] == ()


def test_scaling_keeps_sizes_divisible_by_groups_and_leaves_given_arguments_alone():
    spec = spec_of("torch.nn.Conv2d", in_channels=3072, out_channels=3072, groups=12)
    assert spec.scaled_args == () and spec.parameter("weight").shape == (3072, 256, 3, 3)
    wide = introspect(resolve_target("scaffold_targets.WideGroupedConv"), {})
    assert dict(wide.ctor_args) == {"channels": "24"}
    assert wide.parameter("conv.weight").shape == (24, 2, 3, 3)


def test_missing_required_arguments_are_named():
    with pytest.raises(TargetError, match=r"needs constructor arguments width, depth: pass --arg width=VALUE"):
        spec_of("scaffold_targets.RequiredArgs")


def test_unknown_argument_is_refused():
    with pytest.raises(TargetError, match="takes no argument named colour"):
        spec_of("torch.nn.Linear", colour=1)


def test_raising_constructor_shows_its_message():
    with pytest.raises(TargetError, match=r"RaisingCtor\(\) raised RuntimeError: size must be even"):
        spec_of("scaffold_targets.RaisingCtor")


def test_arg_values_are_python_literals():
    assert parse_arg_overrides(["groups=2", "padding_mode='reflect'", "kernel_size=(3, 5)"]) == {
        "groups": "2",
        "padding_mode": "'reflect'",
        "kernel_size": "(3, 5)",
    }


@pytest.mark.parametrize(
    "pair, message", [("groups", "expected NAME=VALUE"), ("mode=reflect", "not a Python literal")]
)
def test_bad_arg_values_are_explained(pair, message):
    with pytest.raises(TargetError, match=message):
        parse_arg_overrides([pair])
