"""`verify`: PEFT's LoRA contract, run against any LoRA layer class (hand-written, PEFT's own, or generated).

The checks are the generated test suite itself (templates/{{test_module}}.py.jinja) rendered for the layer under
test instead of a generated one, so `verify` and every generated suite share one statement of the contract. What
the layer offers (dropout, lora_bias, DoRA, mixed batches) is found by trying each option on the target: a
ValueError is a clean refusal, and the suite then checks that the option stays refused rather than ignored; any
other outcome counts as support, and the option's checks run (and report the error, if there is one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_scaffold.errors import USER_CODE_ERRORS, ScaffoldError, TargetError
from lora_scaffold.generated_imports import test_imports
from lora_scaffold.import_blocks import format_imports
from lora_scaffold.introspect import TargetSpec
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.peft_release import PeftRelease
from lora_scaffold.render import context_for_verify, render_test_module
from lora_scaffold.resolve import ResolvedTarget, resolve_class


LAYER_ALIAS = "LayerUnderTest"
TIMEOUT = 900  # seconds for the whole suite; a generated one takes a few here
DETAIL_LENGTH = 240


@dataclass(frozen=True)
class OptionTrial:
    """A LoraConfig option a layer may support: its checks run when it does, its refusal is checked when not."""

    key: str
    options: dict
    label: str


DROPOUT = OptionTrial("dropout", {"lora_dropout": 0.5}, "lora_dropout=0.5")
LORA_BIAS = OptionTrial("lora_bias", {"lora_bias": True}, "lora_bias=True")
DORA = OptionTrial("dora", {"use_dora": True}, "use_dora=True")


@dataclass(frozen=True)
class Claims:
    """What the layer under test supports; `refused` maps an option's key to the ValueError it raised."""

    supported: frozenset[str]
    refused: tuple[tuple[OptionTrial, str], ...]
    not_applicable: tuple[tuple[str, str], ...]  # (option, why it is not checked on this target)
    mixed_batch: bool
    mixed_batch_refusal: str


@dataclass(frozen=True)
class Check:
    name: str
    outcome: str  # "pass", "fail" or "skip"
    detail: str = ""


@dataclass(frozen=True)
class Subject:
    """A layer to verify, on its target: the suite rendered for it, and the checks its refusals skip."""

    name: str  # LAYER as the user gave it
    layer: ResolvedTarget
    spec: TargetSpec
    suite: str
    skipped: tuple[Check, ...]


@dataclass(frozen=True)
class Verification:
    layer: str
    target: str
    checks: tuple[Check, ...]
    suite: str  # the rendered test module, as run

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.outcome != "fail" for check in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.outcome == "fail")


def load_layer(spec: str) -> ResolvedTarget:
    """The LoRA layer class LAYER names; it must be a LoraLayer, the only layers PEFT's LoRA model handles."""
    from peft.tuners.lora import LoraLayer

    layer = resolve_class(spec, what="layer")
    if not issubclass(layer.cls, LoraLayer):
        raise TargetError(f"{spec} is not a LoraLayer subclass: PEFT's LoRA model only handles those")
    return layer


def discover_claims(spec: TargetSpec, plan: LayerPlan, layer: type, peft: PeftRelease) -> Claims:
    """Try each option on the target; a ValueError is a refusal, anything else is taken as support."""
    trials, not_applicable = [], []
    if plan.decision.chosen.uses_dropout:
        trials.append(DROPOUT)
    else:
        not_applicable.append((DROPOUT.label, "dropout does not apply to this target's inputs (as PEFT's Embedding)"))
    if plan.weight.bias_name and peft.has_option("lora_bias"):
        trials.append(LORA_BIAS)
    else:
        not_applicable.append(
            (
                LORA_BIAS.label,
                "no bias of the target that an adapter's bias would merge into (or no lora_bias in peft)",
            )
        )
    trials.append(DORA)
    supported, refused = set(), []
    with warnings.catch_warnings():  # the suite shows the layer's warnings where they matter
        warnings.simplefilter("ignore")
        for trial in trials:
            refusal = _refusal(lambda: _model(spec, layer, **trial.options))
            if refusal is None:
                supported.add(trial.key)
            else:
                refused.append((trial, refusal))
        mixed_refusal = _refusal(lambda: _mixed_batch_forward(spec, plan, layer))
    return Claims(
        frozenset(supported), tuple(refused), tuple(not_applicable), mixed_refusal is None, mixed_refusal or ""
    )


def render_suite(plan: LayerPlan, layer: ResolvedTarget, claims: Claims, peft: PeftRelease) -> str:
    layer_import = (layer.import_module, (f"{layer.class_name} as {LAYER_ALIAS}",))
    imports = format_imports(test_imports(plan, peft, layer_import), first_party=("peft", layer.import_module))
    refusals = [(_options_source(trial.options), next(iter(trial.options))) for trial, _ in claims.refused]
    context = context_for_verify(
        plan,
        peft,
        layer_class=LAYER_ALIAS,
        test_imports=imports,
        refusals=refusals,
        uses_dropout=DROPOUT.key in claims.supported,
        lora_bias=LORA_BIAS.key in claims.supported,
        dora=DORA.key in claims.supported,
        mixed_batch=claims.mixed_batch,
    )
    return render_test_module(context)


def run_suites(subjects: list[Subject], timeout: float = TIMEOUT) -> tuple[Verification, ...]:
    """Run the subjects' suites in one fresh pytest process (the layers' own code may crash it; one process pays
    for importing torch and peft once) in a temporary folder, and read one check per test from its JUnit report."""
    with tempfile.TemporaryDirectory(prefix="lora-scaffold-verify-") as folder:
        root = Path(folder)
        (root / "pytest.ini").write_text("[pytest]\n")  # the user's pytest configuration stays out of it
        files = [root / f"test_contract_{index}.py" for index in range(len(subjects))]
        for file, subject in zip(files, subjects):
            file.write_text(subject.suite)
        report = root / "report.xml"
        command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--junitxml", report]
        try:
            result = subprocess.run(
                [str(part) for part in command],
                env=_environment(subjects),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise ScaffoldError(f"the contract checks did not finish within {timeout:.0f} s") from None
        if not report.is_file():
            output = (result.stdout + result.stderr).strip().splitlines()
            raise ScaffoldError(f"pytest could not run the contract checks: {' '.join(output[-3:])}")
        checks = read_report(report.read_text())
    return tuple(
        Verification(
            subject.name, subject.spec.target.spec, checks.get(file.stem, ()) + subject.skipped, subject.suite
        )
        for file, subject in zip(files, subjects)
    )


def read_report(xml: str) -> dict[str, tuple[Check, ...]]:
    """The checks of each test module (by name) of a pytest JUnit XML report."""
    # Imported here: loading its expat extension costs every other command about 0.1 s at start.
    from xml.etree import ElementTree

    checks: dict[str, list[Check]] = {}
    for case in ElementTree.fromstring(xml).iter("testcase"):
        name = check_name(case.get("name", ""))
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            check = Check(name, "fail", _one_line(failure.get("message") or failure.text or ""))
        elif skipped is not None:
            check = Check(name, "skip", _one_line(skipped.get("message") or ""))
        else:
            check = Check(name, "pass")
        checks.setdefault(case.get("classname", "").partition(".")[0], []).append(check)
    return {module: tuple(found) for module, found in checks.items()}


def check_name(test_name: str) -> str:
    """`test_merged_output_equals_unmerged` -> `merged output equals unmerged`; parameters stay in brackets."""
    base, _, parameters = test_name.partition("[")
    text = base.removeprefix("test_").replace("_", " ")
    return f"{text} [{parameters}" if parameters else text


def skipped_checks(claims: Claims) -> tuple[Check, ...]:
    """The option checks that did not run, and why: each refusal is checked instead (unsupported options raise)."""
    skipped = [Check(f"{label} checks", "skip", why) for label, why in claims.not_applicable]
    skipped += [
        Check(f"{trial.label} checks", "skip", f"the layer refuses it: {_one_line(message)}")
        for trial, message in claims.refused
    ]
    if not claims.mixed_batch:
        skipped.append(
            Check("mixed-batch adapter_names checks", "skip", f"the layer refuses it: {claims.mixed_batch_refusal}")
        )
    return tuple(skipped)


class _Holder(nn.Module):
    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, *inputs, **kwargs):
        return self.target(*inputs, **kwargs)


def _config(spec: TargetSpec, layer: type, **options):
    """A LoraConfig that dispatches the target to `layer`, as the rendered suite's make_config does."""
    from peft import LoraConfig

    config = LoraConfig(target_modules=["target"], r=4, init_lora_weights=False, **options)
    config._register_custom_module({spec.target.cls: layer})
    return config


def _model(spec: TargetSpec, layer: type, **options) -> nn.Module:
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_Holder(spec.build()), _config(spec, layer, **options))


def _mixed_batch_forward(spec: TargetSpec, plan: LayerPlan, layer: type) -> None:
    model = _model(spec, layer).eval()
    model.add_adapter("other", _config(spec, layer))
    inputs, keywords = plan.call.example_call()
    batch = len(inputs[0])
    with torch.no_grad():
        model(*inputs, **keywords, adapter_names=(["default", "other"] * batch)[:batch])


def _refusal(attempt) -> str | None:
    """The message of a ValueError `attempt` raised (a clean refusal); None when it raised nothing else either."""
    try:
        attempt()
    except ValueError as exc:
        return _one_line(str(exc)) or "ValueError"
    except USER_CODE_ERRORS:
        return None  # not a refusal: the option's checks run, and show the error
    return None


def _options_source(options: dict) -> str:
    return "{" + ", ".join(f"{key!r}: {value!r}" for key, value in options.items()) + "}"


def _environment(subjects: list[Subject]) -> dict[str, str]:
    """As the user's shell has it, with the folders of file layers and targets importable, and no bytecode written
    beside the user's files."""
    resolved = [found for subject in subjects for found in (subject.layer, subject.spec.target)]
    folders = list(dict.fromkeys([os.getcwd()] + [str(r.from_file.parent) for r in resolved if r.from_file]))
    existing = os.environ.get("PYTHONPATH")
    environment = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    environment["PYTHONPATH"] = os.pathsep.join(folders + ([existing] if existing else []))
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    return environment


def _one_line(text: str) -> str:
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= DETAIL_LENGTH else line[: DETAIL_LENGTH - 3] + "..."
