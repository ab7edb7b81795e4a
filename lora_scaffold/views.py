"""What the CLI shows of a command's outcome: text for people (coloured on a terminal), JSON for programs."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TextIO

from lora_scaffold.audit import Audit
from lora_scaffold.files import FileChange
from lora_scaffold.generate import Generated
from lora_scaffold.introspect import TargetSpec
from lora_scaffold.patch.description import description_path
from lora_scaffold.peft_release import PLUGIN
from lora_scaffold.render import dora_refusal
from lora_scaffold.scan import ScannedClass
from lora_scaffold.verify import Verification
from lora_scaffold.workflow import Outcome, Report


COLOURS = {"create": "32", "update": "32", "overwrite": "33", "delete": "33", "conflict": "31", "identical": "2"}


@dataclass(frozen=True)
class Style:
    colour: bool

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
        return cls(stream.isatty() and not os.environ.get("NO_COLOR"))

    def status(self, word: str, width: int = 9) -> str:
        padded = f"{word:<{width}}"
        return f"\033[{COLOURS[word]}m{padded}\033[0m" if self.colour and word in COLOURS else padded


def spec_text(spec: TargetSpec) -> str:
    guessed = f"  (guessed: {', '.join(spec.guessed_args)})" if spec.guessed_args else ""
    lines = [f"class       {spec.target.qualified_name}"]
    lines.append(
        "signature   (" + ", ".join(p.name if p.required else f"{p.name}={p.default}" for p in spec.ctor_params) + ")"
    )
    built = spec.init or "(" + ", ".join(f"{n}={v}" for n, v in spec.ctor_args) + ")"
    lines.append(f"built with  {built}{guessed}")
    for name, old, new in spec.scaled_args:
        lines.append(f"scaled      {name}: {old} -> {new} (the defaults build more than a million weights)")
    lines.append(f"forward     {spec.forward_arity} positional input(s)")
    lines += ["parameters"] + (
        [
            f"  {p.name:<24} {list(p.shape)} {p.dtype}" + ("  (computed by a parametrization)" if p.computed else "")
            for p in spec.parameters
        ]
        or ["  none"]
    )
    lines += ["buffers"] + ([f"  {b.name:<24} {list(b.shape)} {b.dtype}" for b in spec.buffers] or ["  none"])
    lines += ["attributes"] + ([f"  {n:<24} {v}" for n, v in spec.attributes] or ["  none"])
    return "\n".join(lines)


def spec_json(spec: TargetSpec) -> dict:
    data = asdict(spec)
    data["target"] = {"spec": spec.target.spec, "class": spec.target.qualified_name}
    return {"command": "inspect", **data}


def plan_text(report: Report) -> str:
    plan, spec = report.plan, report.spec
    inferred = "recorded" if plan.call.model_call else "inferred" if plan.call.input_inferred else "given"
    scaled = "".join(
        f"\nscaled    {name} {old} -> {new} to keep the probe and tests small" for name, old, new in spec.scaled_args
    )
    lines = [
        f"target    {plan.target.init or plan.target.given + '(' + ', '.join(f'{n}={v}' for n, v in plan.target.ctor_args) + ')'}{scaled}",
        f"weight    {plan.weight.name} {list(plan.weight.shape)}",
        f"input     {plan.call.example_input} ({inferred})",
        f"strategy  {plan.decision.strategy}: {plan.decision.reason}",
        f"dora      {dora_text(report)}",
        f"peft      written for {report.peft.versions} ({report.peft.mode} mode, peft {report.peft.version_text})",
    ]
    if plan.target.peft_builtin and not plan.target.peft_builtin_exact:
        lines.append(
            f"note      PEFT's own {plan.target.peft_builtin} layer would catch this subclass; this layer takes precedence"
        )
    elif plan.target.peft_builtin:
        lines.append(f"note      PEFT has its own {plan.target.peft_builtin} layer for this type; {_taken(report)}")
    return "\n".join(lines)


def _taken(report: Report) -> str:
    """Which modules of a class PEFT adapts itself the new layer takes from it."""
    weight = report.plan.weight
    if not weight.held_beside and not (weight.stored_in and report.peft.mode == PLUGIN):
        return "registering this one overrides it"
    which = (
        f"whose weight is stored as {weight.stored_in.rpartition('.')[2]}"
        if weight.stored_in
        else f"holding {', '.join(weight.held_beside)}"
    )
    taker = "register()" if report.peft.mode == PLUGIN else "the dispatch branch"
    return f"{taker} takes only those {which}, and leaves PEFT the others"


def dora_text(report: Report) -> str:
    refusal = dora_refusal(report.plan, report.peft)
    if refusal:
        return f"refused (use_dora=True raises): {refusal}"
    return "PEFT's own" if report.plan.decision.chosen.peft_own_layer else "through PEFT's DoRA variant"


def _in_brackets(name: str) -> str:
    return name if name.startswith("(") else f"({name})"  # the model itself is "(the model)" already


def scan_text(found: tuple[ScannedClass, ...]) -> str:
    lines = []
    for scanned in found:
        stored = f" ({scanned.storage})" if scanned.storage else ""
        where = f"{scanned.qualified_name}{stored}  x{scanned.instances} {_in_brackets(scanned.example)}"
        lines.append(where)
        if len(scanned.variants) > 1:
            for variant in scanned.variants:
                shapes = ", ".join(f"{name} {list(shape)}" for name, shape in variant.weights)
                lines.append(f"    x{len(variant.instances)} {_in_brackets(variant.instances[0])}: {shapes}")
        if scanned.handled_by:
            lines.append(f"    PEFT: {scanned.handled_by}")
        else:
            lines.append("    PEFT: not supported")
        if scanned.command or scanned.why_not:
            lines.append(f"    {scanned.command or 'not generated: ' + scanned.why_not}")
        if scanned.unadapted:
            lines.append(f"    {unadapted_text(scanned)}")
    return "\n".join(lines) or "no module of the model holds parameters"


def unadapted_text(scanned: ScannedClass) -> str:
    names = ", ".join(scanned.unadapted)
    return (
        f"leaves {names}: a layer adapts one weight of its class, here {scanned.weight}; "
        f"--weight {scanned.unadapted[0]} makes the layer for another, and scan --generate one for each, stacked"
    )


def scan_json(found: tuple[ScannedClass, ...]) -> dict:
    classes = [
        {
            **asdict(scanned),
            "weights": dict(scanned.weights),
            "variants": [{"instances": list(v.instances), "weights": dict(v.weights)} for v in scanned.variants],
        }
        for scanned in found
    ]
    return {"command": "scan", "classes": classes}


def audit_text(result: Audit) -> str:
    rows = [("module", "class", "layer", "live", "grads", "merge")]
    for m in result.modules:
        merge = "exact" if m.merge_error == 0 else f"{m.merge_error:.0e}" if m.merges else f"OFF {m.merge_error:.1e}"
        merge = "refused (quantized base)" if m.quantized_merge == "refused" else merge
        merge = f"requantized {m.merge_error:.0e}" if m.quantized_merge == "requantized" else merge
        merge = f"refused: {m.merge_refused}" if m.merge_refused else merge
        merge += f" (tied to {m.tied_to}: untied to check)" if m.tied_to else ""
        layer = f"{m.layer} (generated)" if m.generated else m.layer
        live = ("yes" if m.live else "DEAD") if m.reached else "not reached"
        rows.append((m.name, m.cls, layer, live, "yes" if m.gradients else "NONE", merge))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    total = max(result.weight_elements, 1)
    lines.append(
        f"coverage  of {result.weight_elements:,} weight elements (parameters of 2+ dimensions): PEFT alone "
        f"{result.peft_elements / total:.1%}, with the generated layers "
        f"{(result.peft_elements + result.generated_elements) / total:.1%}"
    )
    unreached = [m.name for m in result.modules if not m.reached]
    if unreached:
        lines.append(
            f"unproven  {', '.join(unreached)}: the model's forward on this input never calls them, or only on "
            "empty inputs (pass --model-input with an input that does)"
        )
    lines += [f"gradient  {m.name}: {m.input_gradient}" for m in result.modules if m.input_gradient]
    failed = [m.name for m in result.modules if not m.passed]
    checked = len(result.modules) - len(unreached)
    refused = sum(m.quantized_merge == "refused" for m in result.modules if m.reached)
    merged = f"merged ({refused} refusing to, as a quantized base's layer does)" if refused else "merged"
    said = sum(bool(m.merge_refused) for m in result.modules if m.reached)
    merged += f", {said} refusing to merge in words of its own" if said else ""
    lines.append(
        f"failed    {', '.join(failed)}" if failed else f"all {checked} adapters reached: live, trained, {merged}"
    )
    return "\n".join(lines)


def audit_json(result: Audit) -> dict:
    return {
        "command": "audit",
        "model": result.model,
        "passed": result.passed,
        "modules": [{**asdict(m), "merges": m.merges, "passed": m.passed} for m in result.modules],
        "coverage": {
            "weight_elements": result.weight_elements,
            "peft": result.peft_elements,
            "generated": result.generated_elements,
        },
    }


def generated_text(results: tuple[Generated, ...]) -> str:
    """One line a class of the model: its layer and strategy, or why there is none."""
    lines = []
    for result in results:
        where = f"{result.scanned.qualified_name} ({result.scanned.module}, {result.scanned.weight})"
        if result.module_name:
            lines.append(f"layer     {result.module_name}.{result.layer_class}: {result.strategy}  <- {where}")
            if result.scanned.unadapted:
                lines.append(f"          {unadapted_text(result.scanned)}")
        else:
            lines.append(f"no layer  {where}: {result.error}")
    return "\n".join(lines) or "every class of the model that holds an adaptable weight is PEFT's own"


def generated_json(results: tuple[Generated, ...], classes: int, outcome: Outcome, dry_run: bool) -> dict:
    layers = [
        {
            "class": r.scanned.qualified_name,
            "module": r.scanned.module,
            "weight": r.scanned.weight,
            "unadapted": list(r.scanned.unadapted),
            "layer": r.module_name or None,
            "layer_class": r.layer_class or None,
            "strategy": r.strategy or None,
            "reason": r.reason or None,
            "error": r.error or None,
        }
        for r in results
    ]
    return {**outcome_json("scan", outcome, dry_run), "classes": classes, "layers": layers}


def changes_text(outcome: Outcome, dry_run: bool, style: Style) -> str:
    """One line a file (with its diff in a dry run), then the notes."""
    if outcome.report.nothing_to_do:
        return f"nothing to do: {outcome.report.nothing_to_do}"
    lines = []
    for change in outcome.changes:
        lines.append(f"{'would ' if dry_run else ''}{style.status(change.status)} {change.path}")
        if dry_run and change.changes_disk:
            lines.append(change.diff().rstrip("\n"))
    return "\n".join(lines + [f"note: {note}" for note in outcome.report.notes])


def suite_result_text(result) -> str:
    counts = f"{result.passed} passed, {result.failed} failed, {result.skipped} skipped"
    return f"tests     {result.name}: {counts} in {result.seconds:.1f} s"


def outcome_json(command: str, outcome: Outcome, dry_run: bool, results: tuple = ()) -> dict:
    report = outcome.report
    data = {
        "command": command,
        "dry_run": dry_run,
        "root": str(outcome.root),
        "files": [_change_json(change, dry_run) for change in outcome.changes],
        "notes": list(report.notes),
        "nothing_to_do": report.nothing_to_do or None,
    }
    if report.plan is not None:
        plan = report.plan
        data["layer"] = {
            "target": f"{plan.target.module}.{plan.target.class_name}",
            "constructor": dict(plan.target.ctor_args),
            "weight": {"name": plan.weight.name, "shape": list(plan.weight.shape)},
            "input": {"expression": plan.call.example_input, "inferred": plan.call.input_inferred},
            "strategy": plan.decision.strategy,
            "reason": plan.decision.reason,
            "verdicts": [verdict.as_record() for verdict in plan.decision.verdicts],
            "dora": dora_text(report),
            "layer_class": plan.names.layer_class,
            "module": plan.names.module_name,
        }
        if report.peft.mode == "patch":
            path = outcome.root / description_path(plan.names.module_name)
            written = next((c.new_text for c in outcome.changes if c.path == path), None)
            data["pull_request"] = {
                "path": str(path),
                "description": path.read_text(encoding="utf-8") if path.is_file() and not dry_run else written,
                "tests": [asdict(result) for result in results],
            }
        data["peft"] = {
            "mode": report.peft.mode,
            "version": report.peft.version_text,
            "versions": report.peft.versions,
            "api": report.peft.api,
        }
    return data


def check_json(stale: list[str], outcomes: list[Outcome], updated: bool) -> dict:
    files = [_change_json(change, not updated) for outcome in outcomes for change in outcome.changes if change.writes]
    notes = [note for outcome in outcomes for note in outcome.report.notes]
    return {"command": "check", "stale": stale, "updated": updated, "files": files, "notes": notes}


def _change_json(change: FileChange, with_diff: bool) -> dict:
    data = {"path": str(change.path), "status": change.status}
    if with_diff and change.changes_disk:
        data["diff"] = change.diff()
    return data


VERDICT_WORDS = {"pass": "PASS", "fail": "FAIL", "skip": "skip"}
VERDICT_COLOURS = {"pass": "32", "fail": "31", "skip": "2"}


def verification_text(verification: Verification, style: Style) -> str:
    lines = [f"{verification.layer} on {verification.target}: PEFT's LoRA contract"]
    for check in verification.checks:
        word = f"{VERDICT_WORDS[check.outcome]:<5}"
        if style.colour:
            word = f"\033[{VERDICT_COLOURS[check.outcome]}m{word}\033[0m"
        lines.append(f"{word} {check.name}" + (f": {check.detail}" if check.detail else ""))
    counts = {outcome: sum(c.outcome == outcome for c in verification.checks) for outcome in VERDICT_WORDS}
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(lines)


def verification_json(verification: Verification) -> dict:
    return {
        "command": "verify",
        "layer": verification.layer,
        "target": verification.target,
        "passed": verification.passed,
        "checks": [asdict(check) for check in verification.checks],
        "error": None,
    }
