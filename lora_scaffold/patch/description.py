"""The pull-request description patch mode writes beside the generation record (kept out of git there): what the
layer is, how LoRA applies and the probe's figures, the options supported and refused, the files, the tests and, with
`--run-tests`, what they gave on the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from lora_scaffold import __version__
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.peft_release import PeftRelease
from lora_scaffold.record import RECORD_DIR
from lora_scaffold.render import dora_refusal, render_snippet


TEST_TIMEOUT = 1800  # seconds for each of the two runs


@dataclass(frozen=True)
class SuiteResult:
    name: str
    passed: int
    failed: int
    skipped: int
    seconds: float


def description_path(module_name: str) -> str:
    return f"{RECORD_DIR}/{module_name}.pr.md"


def describe(
    plan: LayerPlan, peft: PeftRelease, files: list[tuple[str, str]], results: tuple[SuiteResult, ...] = ()
) -> str:
    """`files`: (path from the checkout's root, what happens to it)."""
    import torch

    context = {
        "target": f"{plan.target.module}.{plan.target.class_name}",
        "class_name": plan.target.class_name,
        "request_target": plan.target.given,
        "layer_class": plan.names.layer_class,
        "module_name": plan.names.module_name,
        "weight_name": plan.weight.name,
        "weight_shape": list(plan.weight.shape),
        "version": __version__,
        "peft_version": peft.version_text,
        "torch_version": torch.__version__,
        "strategy": plan.decision.strategy,
        "reason": plan.decision.reason,
        "verdicts": [{"label": v.label, "matched": v.matched, "text": v.error_text} for v in plan.decision.verdicts],
        "options": options(plan, peft),
        "battery": f"not wired in: {plan.call.battery_blocker}"
        if plan.call.battery_blocker
        else "its cases in PEFT's own style",
        "files": [{"path": path, "status": status} for path, status in files],
        "results": [result.__dict__ for result in results],
        "backend": f"{plan.names.layer_class}Backend" if plan.decision.adds_quantization_backend(peft) else "",
        "merges": bool(dict(plan.decision.answers).get("round_trip")),
    }
    return render_snippet("partials/pull_request.md.jinja", context)


def options(plan: LayerPlan, peft: PeftRelease) -> list[tuple[str, str]]:
    """Each LoRA option and what the layer does with it, the refusals with their reasons."""
    strategy = plan.decision.chosen
    refusal = dora_refusal(plan, peft)
    listed = [
        ("use_dora", f"refused (ValueError): {refusal}" if refusal else "supported, through PEFT's DoRA variant"),
        ("lora_dropout", "supported" if strategy.uses_dropout else "not applied (the input is indices)"),
        ("use_rslora", "supported"),
        ("mixed batches (`adapter_names`)", "supported" if strategy.mixed_batch else "refused (ValueError)"),
    ]
    refused = {option: f"refused (ValueError): {why}" for option, why in strategy.refused_options.items()}
    if peft.has_option("lora_bias") and "lora_bias" not in refused:
        refused["lora_bias"] = (
            "supported" if plan.weight.bias_name else "accepted, with no bias beside the weight to merge"
        )
    return listed + [(option, text) for option, text in refused.items() if peft.has_option(option)]


def run_tests(root: Path, plan: LayerPlan) -> tuple[SuiteResult, ...]:
    """The generated suite and PEFT's battery on the new cases, each in a pytest of its own in the checkout."""
    runs = [("generated suite", [f"tests/test_{plan.names.module_name}.py"])]
    if not plan.call.battery_blocker:
        runs.append(("PEFT's battery", ["tests/test_custom_models.py", "-k", plan.names.layer_class]))
    return tuple(_run(root, name, arguments) for name, arguments in runs)


def _run(root: Path, name: str, arguments: list[str]) -> SuiteResult:
    root = root.resolve()  # the tests run inside it, with its src/ first on the path
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov", f"--junitxml={junit}"]
        environment = {**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"}
        started = time.monotonic()
        subprocess.run(
            [*command, *arguments], cwd=root, env=environment, capture_output=True, text=True, timeout=TEST_TIMEOUT
        )
        seconds = time.monotonic() - started
        if not junit.is_file():
            return SuiteResult(name, 0, 1, 0, seconds)
        cases = list(ElementTree.parse(junit).iter("testcase"))
    failed = sum(1 for case in cases if case.find("failure") is not None or case.find("error") is not None)
    skipped = sum(1 for case in cases if case.find("skipped") is not None)
    return SuiteResult(name, len(cases) - failed - skipped, failed, skipped, seconds)
