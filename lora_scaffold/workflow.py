"""The commands as functions: typed options in, planned file changes and a report out. Nothing here prints or
writes; the CLI shows the report and applies the changes (`files.apply_changes`) unless asked for a dry run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_scaffold import journal, verify
from lora_scaffold.analyse import analyse, low_rank_note
from lora_scaffold.constructor import parse_arg_overrides
from lora_scaffold.errors import AnalysisError, MergeConflictError, ScaffoldError, WriteError
from lora_scaffold.files import (
    FileChange,
    GeneratedFile,
    apply_changes,
    plan_changes,
    refuse_conflicts,
)
from lora_scaffold.introspect import TargetSpec, introspect
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.merge import merge_file
from lora_scaffold.patch.checkout import read_text
from lora_scaffold.peft_release import PLUGIN, PeftRelease, installed_peft, release_for
from lora_scaffold.record import RECORD_DIR, GenerationRecord, digest, record_path
from lora_scaffold.render import render
from lora_scaffold.request import Request
from lora_scaffold.resolve import resolve_target
from lora_scaffold.scan import ScannedClass, build_model, from_model, other_instances, scan


@dataclass(frozen=True)
class Report:
    """What a command found and decided, for the CLI to show."""

    spec: TargetSpec | None = None
    plan: LayerPlan | None = None
    peft: PeftRelease | None = None
    notes: tuple[str, ...] = ()
    nothing_to_do: str = ""


@dataclass(frozen=True)
class Outcome:
    """The planned changes, all below `root`, and the report."""

    root: Path
    changes: tuple[FileChange, ...]
    report: Report = field(default_factory=Report)

    def apply(self) -> None:
        apply_changes(self.changes, self.root)


@dataclass(frozen=True)
class Run:
    """What every command that writes does first and last: complete or undo what an interrupted run left in `root`
    (before anything reads it: `recovered` says what was done), and plan its files against the disk, refusing to
    replace a file someone edited unless `force`."""

    root: Path
    force: bool = False
    dry_run: bool = False
    recovered: tuple[str, ...] = ()

    @classmethod
    def start(cls, root: Path, force: bool = False, dry_run: bool = False) -> Run:
        return cls(root, force, dry_run, recover_interrupted(root, dry_run))

    def changes(self, files: tuple[GeneratedFile, ...], updatable=frozenset()) -> tuple[FileChange, ...]:
        """Paths in `updatable` (files this run edits, or wrote earlier and nobody edited since) may change."""
        changes = plan_changes(files, self.root, force=self.force, updatable=frozenset(updatable))
        refuse_conflicts(changes)
        return changes


def inspect_target(request: Request) -> TargetSpec:
    return introspect(resolve_target(request.target), parse_arg_overrides(list(request.args)), request.init)


def request_from_model(model: str, module_name: str, model_input: str | None, **options) -> Request:
    """`new --from-model MODEL --module NAME`: the submodule's class, built from the model and called as the model
    calls it (on --model-input, or an input made from the model's config)."""
    target, init, call = from_model(model, module_name, model_input)
    return Request(target, init=init, model=call.model, module=call.module, model_input=call.model_input, **options)


def scan_model(model: str, model_input: str | None = None) -> tuple[ScannedClass, ...]:
    """`scan`: the module classes of MODEL that hold weights, and how each gets LoRA."""
    return scan(build_model(model), model, model_input)


def plan_layer(request: Request) -> tuple[TargetSpec, LayerPlan]:
    """Resolve, introspect and analyse: everything up to rendering. A target taken from a model is checked on every
    instance of its class there (one of each set of weight shapes): the layer applies to all of them."""
    spec = inspect_target(request)
    plan = analyse(spec, request.options)
    if request.model_call is not None:
        for other in other_instances(request.model, request.module):
            _check_instance(request, plan, other)
    return spec, plan


def _check_instance(request: Request, plan: LayerPlan, module: str) -> None:
    _, init, _ = from_model(request.model, module, request.model_input)
    other = replace(request, module=module, init=init)
    try:
        analyse(inspect_target(other), replace(other.options, strategy=plan.decision.chosen.family))
    except ScaffoldError as error:
        raise AnalysisError(f"{module}, another {plan.target.class_name} of the model: {error}") from None


def verify_layers(layers: list[tuple[str, Request | None]]) -> tuple[verify.Verification, ...]:
    """`verify LAYER`: the contract checks every generated suite makes, run against each LAYER on its request's
    target (without one, on the target of the generation record beside a generated LAYER), all in one pytest
    process. Changes nothing on disk."""
    peft = installed_peft(PLUGIN)
    subjects = []
    for layer_spec, request in layers:
        layer = verify.load_layer(layer_spec)
        request = request or _recorded_request(layer)
        spec, plan = plan_layer(request)
        claims = verify.discover_claims(spec, plan, layer.cls, peft)
        suite = verify.render_suite(plan, layer, claims, peft)
        subjects.append(verify.Subject(layer_spec, layer, spec, suite, verify.skipped_checks(claims)))
    return verify.run_suites(subjects)


def _recorded_request(layer) -> Request:
    where = layer.from_file and layer.from_file.parent / record_path(layer.from_file.stem)
    record = _read_record(where) if where else None
    if record is None:
        raise ScaffoldError(f"{layer.spec}: give --target (no generation record beside it says what it adapts)")
    return record.request


def new_plugin(
    request: Request, output: Path, force: bool = False, peft: PeftRelease | None = None, dry_run: bool = False
) -> Outcome:
    """`new -o DIR`: the layer, its tests and its record, for the installed peft (or the one given)."""
    if output.exists() and not output.is_dir():
        raise WriteError(f"-o {output}: exists and is not a folder")
    run = Run.start(output, force, dry_run)
    peft = peft or installed_peft(PLUGIN)
    spec, plan = plan_layer(request)
    rendered = render(plan, peft)
    files = (*rendered, record_file(rendered, request, plan, peft))
    previous = _read_record(output / record_path(plan.names.module_name))
    changes = run.changes(files, unedited(output, previous))
    notes = run.recovered + tuple(note for note in (low_rank_note(plan), _same_class_note(output, plan)) if note)
    if spec.target.from_file is not None:
        notes += (
            f"the generated code imports {plan.target.module}; put {spec.target.from_file.parent} on PYTHONPATH",
        )
    return Outcome(output, changes, Report(spec, plan, peft, notes))


def _same_class_note(output: Path, plan: LayerPlan) -> str:
    """Two layers of one class in a folder: each one's register makes the class dispatch to it alone."""
    target = f"{plan.target.module}.{plan.target.class_name}"
    for path in sorted((output / RECORD_DIR).glob("lora_*.json")):
        try:
            record = _read_record(path)
        except ScaffoldError:
            continue  # not ours to judge here: `update` and `audit` say what is wrong with it
        if record and record.target == target and record.module_name != plan.names.module_name:
            return (
                f"{output} holds {record.module_name} for {plan.target.class_name} too: a class dispatches to the "
                "layer registered last; `scan --generate` writes a package that stacks a class's layers, one a weight"
            )
    return ""


def update_plugin(layer_file: Path, change: dict, conflicts: str = "stop", dry_run: bool = False) -> Outcome:
    """`update FILE`: the layer rendered again (with the changed options, by this lora-scaffold), your edits merged."""
    root, module_name = layer_file.parent, layer_file.stem
    run = Run.start(root, force=True, dry_run=dry_run)  # the merge keeps the edits: nothing is lost
    record = _read_record(root / record_path(module_name))
    if record is None or record.mode != PLUGIN:
        raise ScaffoldError(
            f"{layer_file}: no generation record of a plugin layer at {root / record_path(module_name)}; "
            "update works on layers `new -o` wrote"
        )
    request = record.request.updated(**change)
    peft = installed_peft(PLUGIN)
    spec, plan = plan_layer(request)
    _refuse_renaming(plan.names.module_name, module_name)
    rendered = render(plan, peft)
    merged, notes = merged_edits(root, rendered, record, conflicts)
    files = (*merged, record_file(rendered, request, plan, peft))
    return Outcome(root, run.changes(files), Report(spec, plan, peft, run.recovered + notes))


def _refuse_renaming(new_module: str, module_name: str) -> None:
    if new_module != module_name:
        raise ScaffoldError(
            f"these options would rename {module_name} to {new_module}: update keeps the name; use `new` for a new layer"
        )


def merged_edits(
    root: Path, rendered: tuple[GeneratedFile, ...], record: GenerationRecord, conflicts: str
) -> tuple[tuple[GeneratedFile, ...], tuple[str, ...]]:
    """The new render of each file with the edits made since `record` merged in; refuses on a conflicting hunk
    unless `conflicts` is "markers"."""
    merged, notes, clashes = [], [], []
    for generated in rendered:
        path = root / generated.path
        ours = read_text(path) if path.is_file() else None
        base = record.pristine.get(generated.path)
        if ours is None or digest(ours) == record.files.get(generated.path):
            base = ours = ours if ours is not None else generated.text  # not edited (or gone): the new render
        elif base is None:
            raise MergeConflictError(
                f"{generated.path} was edited, and its record (from an older lora-scaffold) keeps no copy of what "
                "was generated to merge from: move your edits aside and run update again"
            )
        result = merge_file(generated.path, base, ours, generated.text)
        clashes += result.conflicts
        if ours != base:
            notes.append(f"merged your edits into {generated.path}")
        merged.append(GeneratedFile(generated.path, result.text))
    if clashes and conflicts != "markers":
        raise MergeConflictError(
            "; ".join(clash.describe() for clash in clashes)
            + ". Nothing was written: resolve the overlap, or pass --conflicts=markers to write conflict markers"
        )
    if clashes:
        notes.append(f"conflict markers written: {'; '.join(clash.describe() for clash in clashes)}")
    return tuple(merged), tuple(notes)


def check_examples(root: Path, dry_run: bool = True) -> tuple[list[str], list[Outcome]]:
    """Re-render every example of `root/manifest.json`: the stale ones, and what refreshes each."""
    peft, examples = load_manifest(root)
    outcomes = [new_plugin(request, root / folder, True, peft, dry_run) for folder, request in examples.items()]
    stale = [folder for folder, outcome in zip(examples, outcomes) if any(c.writes for c in outcome.changes)]
    return stale, outcomes


def recover_interrupted(root: Path, dry_run: bool) -> tuple[str, ...]:
    """Complete or undo what an interrupted run left in `root`, before anything else reads it."""
    if not journal.pending(root):
        return ()
    if dry_run:
        raise WriteError(f"an interrupted run left {root} half-written; run again without --dry-run to complete it")
    return (journal.recover(root),)


def load_manifest(root: Path) -> tuple[PeftRelease, dict[str, Request]]:
    """`{"peft": VERSION, "examples": {folder: request}}`: the peft the examples are written for, and what each is."""
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScaffoldError(f"cannot read {path}: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or set(manifest) != {"peft", "examples"}
        or not isinstance(manifest["examples"], dict)
    ):
        raise ScaffoldError(f'{path} should be {{"peft": "VERSION", "examples": {{folder: {{"target": ...}}}}}}')
    for folder in manifest["examples"]:
        if not folder or Path(folder).name != folder or folder.startswith("."):
            raise ScaffoldError(f"{path}: example folder {folder!r} must be a plain folder name inside {root}")
    examples = {f: Request.from_dict(r, f"{path}, example {f!r}") for f, r in manifest["examples"].items()}
    return release_for(PLUGIN, str(manifest["peft"])), examples


def record_file(
    rendered: tuple[GeneratedFile, ...],
    request: Request,
    plan: LayerPlan,
    peft: PeftRelease,
    edits: dict | None = None,
) -> GeneratedFile:
    """The generation record of `rendered` (what was asked, decided and written, with a copy to merge edits from)."""
    record = GenerationRecord(
        request=request,
        mode=peft.mode,
        peft_version=peft.version_text,
        layer_api=peft.api,
        target=f"{plan.target.module}.{plan.target.class_name}",
        constructor=dict(plan.target.ctor_args),
        strategy=plan.decision.strategy,
        reason=plan.decision.reason,
        verdicts=[verdict.as_record() for verdict in plan.decision.verdicts],
        layer_class=plan.names.layer_class,
        module_name=plan.names.module_name,
        files={generated.path: digest(generated.text) for generated in rendered},
        edits=edits,
        pristine={generated.path: generated.text for generated in rendered},
    )
    return GeneratedFile(record.path, record.to_json())


def _read_record(path: Path) -> GenerationRecord | None:
    return GenerationRecord.from_json(read_text(path), str(path)) if path.is_file() else None


def unedited(root: Path, record: GenerationRecord | None) -> set[str]:
    """Files of an earlier run that nobody edited since, and its record: a new run may replace them."""
    if record is None:
        return set()
    return {path for path, hash_ in record.files.items() if digest_on_disk(root / path) == hash_} | {record.path}


def digest_on_disk(path: Path) -> str | None:
    return digest(read_text(path)) if path.is_file() else None
