"""Property test: on 100 random module classes, `new` gives a layer whose adapter equals running the module with
W + dW (checked here, independently of the generated suite) and whose generated suite passes, or a clean refusal."""

import importlib
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from random_modules import module_source, random_classes
from test_end_to_end import run_suites, suite_counts
from torch import nn
from torch.func import functional_call

from lora_scaffold import workflow
from lora_scaffold.errors import ScaffoldError
from lora_scaffold.request import Request
from lora_scaffold.sample_input import evaluate_input


COUNT = 100
# What each formula must get: a strategy, or a refusal.
EXPECTED = {
    "linear": "linear",
    "linear_in_out": "linear",
    "extra": "linear",
    "conv1d": "conv",
    "conv2d": "conv",
    "rank0": "refused",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    classes = random_classes(COUNT)
    (root / "random_targets.py").write_text(module_source(classes))
    sys.path.insert(0, str(root))
    outcomes = {}
    for cls in classes:
        request = Request(f"random_targets.{cls.name}", cls.args, weight=cls.weight, name=cls.name.lower())
        try:
            outcome = workflow.new_plugin(request, root / "out")
        except ScaffoldError as error:
            outcomes[cls.name] = (cls, None, str(error))
            continue
        outcome.apply()
        outcomes[cls.name] = (cls, outcome.report.plan, "")
    yield root, outcomes
    sys.path.remove(str(root))


def test_each_class_gets_a_layer_or_a_clean_refusal(generated):
    _, outcomes = generated
    for cls, plan, error in outcomes.values():
        expected = EXPECTED.get(cls.formula, "delta")
        got = "refused" if plan is None else plan.decision.strategy
        assert got == expected, (cls.name, cls.formula, got, error or plan.decision.reason)
        assert not error or "\n" not in error


def test_adapter_equals_the_module_run_with_the_changed_weight(generated):
    root, outcomes = generated
    sys.path.insert(0, str(root / "out"))
    try:
        for cls, plan, _ in outcomes.values():
            if plan is not None:
                check_adapter(plan)
    finally:
        sys.path.remove(str(root / "out"))


class Holder(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, *inputs):
        return self.target(*inputs)


def check_adapter(plan):
    layer_module = importlib.import_module(plan.names.module_name)
    target_class = getattr(importlib.import_module(plan.target.module), plan.target.class_name)
    torch.manual_seed(1)
    kwargs = {name: eval(source) for name, source in plan.target.ctor_args}  # noqa: S307 - literals the plan holds
    config = layer_module.register(LoraConfig(target_modules=["target"], r=4, init_lora_weights=False))
    layer = get_peft_model(Holder(target_class(**kwargs)), config).base_model.model.target
    layer.eval()
    inputs = evaluate_input(plan.call.example_input, seed=3)
    base = layer.get_base_layer()
    weight = base.get_parameter(plan.weight.name)
    with torch.no_grad():
        adapted = layer(*inputs)
        expected = functional_call(base, {plan.weight.name: weight + layer.get_delta_weight("default")}, inputs)
    torch.testing.assert_close(adapted, expected, rtol=1e-4, atol=1e-5, msg=plan.target.class_name)


# The 100 random classes' suites: slow (test_each_class_gets_a_layer_or_a_clean_refusal and the adapter check stay quick).
@pytest.mark.slow
def test_generated_suites_pass(generated, tmp_path):
    root, outcomes = generated
    result = run_suites([root / "out"], tmp_path / "junit.xml", extra_paths=(root, root / "out"))
    counts = suite_counts(tmp_path / "junit.xml")
    layers = sum(plan is not None for _, plan, _ in outcomes.values())
    assert result.returncode == 0, result.stdout[-5000:]
    assert len(counts) == layers
    assert all(c["failed"] == 0 and c["skipped"] == 0 and c["passed"] >= 17 for c in counts.values()), counts
