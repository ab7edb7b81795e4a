"""Generated layers under DDP and FSDP2 in two processes (gloo, CPU, 127.0.0.1), compared with one process taking
the same step on the same global batch: a factored layer (conv), a delta layer (a non-linear use of the weight),
a delta layer whose training forward takes the factored path (F.linear of the weight, then relu) and an experts layer
on a stacked `[experts, in, out]` weight, whose training forward takes it too (bmm with the bank). tests/distributed_driver.py runs the processes."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from distributed_driver import (
    CASES,
    global_batch,
    load_layer_module,
    make_base,
    make_config,
    make_model,
    single_process_step,
)
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from lora_scaffold.request import Request
from lora_scaffold.workflow import new_plugin


pytestmark = pytest.mark.slow  # a quick local run: python -m pytest -m 'not slow'


ENGINES = ("ddp", "fsdp", "fsdp_bf16", "fsdp_base_unit")
TIMEOUT = 300  # seconds for one case's three runs; each takes about ten here
# Two processes reduce in another order than one: float32 sums of a few hundred terms agree to about 1e-7.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", params=sorted(CASES))
def distributed(request, tmp_path_factory):
    """The case, its generated layer module and what rank 0 saved from each engine."""
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    outcome = new_plugin(Request(case.target, args=case.args, example_input=case.example_input), folder / "layer")
    outcome.apply()
    layer_file = next(c.path for c in outcome.changes if c.path.name.startswith("lora_") and c.path.suffix == ".py")
    paths = [str(REPO), str(REPO / "tests"), str(layer_file.parent)]
    command = [sys.executable, str(REPO / "tests" / "distributed_driver.py"), request.param, str(layer_file)]
    result = subprocess.run(
        [*command, str(free_port()), str(folder)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    saved = {engine: torch.load(folder / f"{engine}.pt") for engine in ENGINES}
    return case, load_layer_module(str(layer_file)), saved


def test_ddp_gradients_equal_one_process_and_base_weights_stay(distributed):
    case, layer_module, saved = distributed
    _, expected = single_process_step(case, layer_module)
    assert saved["ddp"]["base_unchanged"]
    assert saved["ddp"]["gradients"].keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(saved["ddp"]["gradients"][name], gradient, **TOLERANCE, msg=name)


def test_fsdp2_adapter_after_one_step_equals_one_process(distributed):
    case, layer_module, saved = distributed
    reference, _ = single_process_step(case, layer_module)
    expected = get_peft_model_state_dict(reference)
    assert saved["fsdp"]["adapter"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved["fsdp"]["adapter"][name], value, **TOLERANCE, msg=name)


def test_fsdp2_adapter_saves_reloads_and_merges_in_one_process(distributed, tmp_path):
    case, layer_module, saved = distributed
    reference, _ = single_process_step(case, layer_module)
    trained = make_model(case, layer_module)
    set_peft_model_state_dict(trained, saved["fsdp"]["adapter"])
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_base(case), tmp_path, config=make_config(layer_module))
    inputs = global_batch(case)
    with torch.no_grad():
        expected = reference(inputs)
        torch.testing.assert_close(loaded(inputs), expected, **TOLERANCE)
        torch.testing.assert_close(loaded.merge_and_unload()(inputs), expected, **TOLERANCE)


def test_fsdp2_with_bf16_parameters_and_fp32_reduction_stays_finite(distributed):
    _, _, saved = distributed
    assert torch.isfinite(saved["fsdp_bf16"]["loss"])
    assert saved["fsdp_bf16"]["finite_gradients"]


def test_fsdp2_unit_of_the_base_module_alone_works_for_factored_layers_and_is_refused_by_delta(distributed):
    case, _, saved = distributed
    result = saved["fsdp_base_unit"]
    if case.target == "mypkg.MyConv":
        assert result["error"] is None and torch.isfinite(result["loss"])
    else:
        assert "apply fully_shard to this LoRA layer" in result["error"]
