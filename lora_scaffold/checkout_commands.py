"""Patch mode's commands: `new`, `update` and `remove` with --peft-checkout, as functions. Like workflow.py, nothing
here prints or writes: each returns the planned changes and a report."""

from __future__ import annotations

from pathlib import Path

from lora_scaffold.errors import PatchError
from lora_scaffold.files import (
    FileChange,
    GeneratedFile,
    apply_changes,
    plan_changes,
    plan_deletions,
)
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.names import layer_names
from lora_scaffold.patch.checkout import LORA_PACKAGE, PeftCheckout, checkout_root, read_checkout
from lora_scaffold.patch.description import describe, description_path, run_tests
from lora_scaffold.patch.exports import INIT_FILE, exported_names
from lora_scaffold.patch.plan import PatchEdits, as_files, edited_sources, plan_edits, reverted_sources
from lora_scaffold.peft_release import PeftRelease
from lora_scaffold.record import IGNORE_FILE, IGNORE_TEXT, RECORD_DIR, GenerationRecord
from lora_scaffold.render import render
from lora_scaffold.request import Request
from lora_scaffold.workflow import (
    Outcome,
    Report,
    Run,
    digest_on_disk,
    merged_edits,
    plan_layer,
    record_file,
    unedited,
)


def patch_checkout(
    request: Request, checkout_path: str, force: bool = False, dry_run: bool = False, conflicts: str | None = None
) -> Outcome:
    """`new --peft-checkout PATH`: the layer becomes part of PEFT (module, dispatch, export, tests). With
    `conflicts` (`update`), the generated files merge the edits made since the last run instead of refusing them."""
    checkout, run = _open_checkout(checkout_path, force, dry_run)
    return _patch(request, checkout, run, conflicts)


def _patch(request: Request, checkout: PeftCheckout, run: Run, conflicts: str | None) -> Outcome:
    spec, plan = plan_layer(request)
    if plan.target.peft_builtin_exact and not plan.weight.held_beside and not run.force:
        raise PatchError(
            f"PEFT already supports {plan.target.module}.{plan.target.class_name} with its own {plan.target.peft_builtin} layer; "
            "pass --force to put a branch for the generated layer before PEFT's"
        )
    previous = checkout.record(plan.names.module_name)
    rendered = _layer_and_tests(checkout, plan, request.target, previous)
    edits = plan_edits(plan, spec.target.cls, checkout)
    sources = checkout.edited_sources()
    if previous is not None and previous.edits != edits.as_dict():
        sources = reverted_sources(sources, PatchEdits.from_dict(previous.edits), run.force)
    merged, notes = rendered, run.recovered
    if conflicts is not None and previous is not None:
        merged, merge_notes = merged_edits(checkout.root, rendered, previous, conflicts)
        notes += merge_notes
    files = (
        *merged,
        record_file(rendered, request, plan, checkout.peft, edits.as_dict()),
        *as_files(edited_sources(sources, edits)),
        GeneratedFile(IGNORE_FILE, IGNORE_TEXT),
    )
    updatable = unedited(checkout.root, previous) | set(checkout.edited_sources()) | {IGNORE_FILE}
    changes = _checkout_changes(checkout, run, files, updatable)
    notes += _wiring_notes(plan, edits, rendered[1].path)
    nothing = "" if any(c.changes_disk for c in changes) else f"{checkout.root} already has {plan.names.layer_class}"
    if not nothing:
        changes += (pull_request_change(checkout.root, plan, checkout.peft, changes),)
    return Outcome(checkout.root, changes, Report(spec, plan, checkout.peft, notes, nothing))


def _layer_and_tests(
    checkout: PeftCheckout, plan: LayerPlan, target: str, previous: GenerationRecord | None
) -> tuple[GeneratedFile, ...]:
    """The layer module in PEFT's lora package and its tests in PEFT's tests, refused where they would take over a
    file or a name that is not this layer's."""
    _refuse_foreign_layer(checkout, plan.names.module_name, target, previous)
    rendered = tuple(
        GeneratedFile(f"{folder}/{generated.path}", generated.text)
        for folder, generated in zip((LORA_PACKAGE, "tests"), render(plan, checkout.peft))
    )
    _refuse_taking_over(checkout, plan.names.layer_class, [generated.path for generated in rendered], previous)
    return rendered


def _wiring_notes(plan: LayerPlan, edits: PatchEdits, tests_path: str) -> tuple[str, ...]:
    notes = ()
    if not edits.supported:
        notes += ("model.py's message listing the supported modules has another shape: left as it is",)
    if plan.call.battery_blocker and edits.battery is None:
        notes += (f"not wired into PEFT's test battery: {plan.call.battery_blocker}; {tests_path} covers the layer",)
    return notes


def test_checkout(outcome: Outcome) -> tuple:
    """`--run-tests`: the generated suite and PEFT's battery on the new cases, then the description with them."""
    report = outcome.report
    results = run_tests(outcome.root, report.plan)
    change = pull_request_change(outcome.root, report.plan, report.peft, outcome.changes, results)
    apply_changes((change,), outcome.root)
    return results


def pull_request_change(root: Path, plan: LayerPlan, peft: PeftRelease, changes, results=()) -> FileChange:
    """The pull-request description beside the record (out of git, like it): lora-scaffold's own, replaced freely."""
    shown = [
        (str(change.path.relative_to(root)), change.status)
        for change in changes
        if change.changes_disk and RECORD_DIR not in change.path.parts
    ]
    text = describe(plan, peft, shown, results)
    path = description_path(plan.names.module_name)
    (change,) = plan_changes((GeneratedFile(path, text),), root, force=False, updatable=frozenset({path}))
    return change


def remove_from_checkout(
    target: str, name: str | None, checkout_path: str, force: bool = False, dry_run: bool = False
) -> Outcome:
    """`remove`: take out exactly what `new` added, as its generation record says."""
    checkout, run = _open_checkout(checkout_path, force, dry_run)
    module_name = _module_name(target, name)
    record = checkout.record(module_name)
    _refuse_foreign_layer(checkout, module_name, target, record)
    if record is None:
        return Outcome(
            checkout.root, (), Report(notes=run.recovered, nothing_to_do=f"{checkout.root} has no {module_name}")
        )
    edited = [
        path for path, hash_ in record.files.items() if digest_on_disk(checkout.root / path) not in (hash_, None)
    ]
    if edited and not force:
        raise PatchError(f"{', '.join(edited)} changed since lora-scaffold wrote it; pass --force to remove it anyway")
    reverted = reverted_sources(checkout.edited_sources(), PatchEdits.from_dict(record.edits), force)
    changes = _checkout_changes(checkout, run, as_files(reverted), frozenset(reverted))
    owned = [*record.files, record.path, description_path(module_name)]
    if checkout.records() == [Path(record.path).name]:
        owned.append(IGNORE_FILE)
    return Outcome(
        checkout.root, changes + plan_deletions([checkout.path(p) for p in owned]), Report(notes=run.recovered)
    )


def update_checkout(
    target: str, name: str | None, checkout_path: str, change: dict, conflicts: str = "stop", dry_run: bool = False
) -> Outcome:
    """`update TARGET --peft-checkout PATH`: as update_plugin, for a layer patched into a checkout (and its wiring)."""
    checkout, run = _open_checkout(checkout_path, True, dry_run)  # the merge keeps the edits: nothing is lost
    module_name = _module_name(target, name)
    record = checkout.record(module_name)
    if record is None:
        raise PatchError(
            f"{checkout.root} has no generation record for {module_name}: update works in the checkout `new "
            "--peft-checkout` patched (the records stay out of git there, and so out of fresh clones)"
        )
    return _patch(record.request.updated(**change), checkout, run, conflicts)


def _open_checkout(checkout_path: str, force: bool, dry_run: bool) -> tuple[PeftCheckout, Run]:
    """The checkout, read once the run has completed or undone what an interrupted one left in it (its records and
    sources are only whole then)."""
    run = Run.start(checkout_root(checkout_path), force, dry_run)
    return read_checkout(checkout_path), run


def _module_name(target: str, name: str | None) -> str:
    return layer_names(target.rpartition(":" if ":" in target else ".")[2], name)[1]


def _refuse_foreign_layer(checkout: PeftCheckout, module_name: str, target: str, record: GenerationRecord | None):
    """A layer module of that name that lora-scaffold did not write for this target is an error, --force or not."""
    layer = f"{LORA_PACKAGE}/{module_name}.py"
    if record is not None and record.request.target == target:
        return
    if record is not None or checkout.path(layer).exists():
        owner = f"lora-scaffold's layer for {record.request.target}" if record else "not lora-scaffold's"
        raise PatchError(f"{layer} already exists and is {owner}, not for {target}; pick another name with --name")


def _refuse_taking_over(checkout: PeftCheckout, layer_class: str, paths: list[str], previous) -> None:
    """Nothing PEFT owns is ever overwritten or re-exported, --force or not: a name already taken is an error."""
    ours = set(previous.files) if previous else set()
    for path in paths:
        if path not in ours and checkout.path(path).exists():
            raise PatchError(f"{path} exists and lora-scaffold did not write it; pick another name with --name")
    if previous is None and layer_class in exported_names(checkout.source(INIT_FILE)):
        raise PatchError(f"PEFT already exports a {layer_class}; pick another name with --name")


def _checkout_changes(checkout: PeftCheckout, run: Run, files, updatable) -> tuple[FileChange, ...]:
    for generated in files:
        checkout.path(generated.path)  # refuses paths outside the checkout and symbolic links
    return run.changes(files, updatable)
