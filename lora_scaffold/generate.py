"""`scan MODEL --generate -o DIR`: a layer and its suite for every class of the model that holds a weight LoRA can
adapt and PEFT cannot, each taken from the model (`new --from-model`), and DIR/__init__.py with one `register(config)`
for all of them. The whole folder is one change: written all at once, or not at all."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_scaffold import __version__, workflow
from lora_scaffold.errors import ScaffoldError, WriteError
from lora_scaffold.files import FileChange, plan_changes, refuse_conflicts
from lora_scaffold.layout import layout
from lora_scaffold.names import layer_names
from lora_scaffold.record import RECORD_DIR, digest
from lora_scaffold.render import GeneratedFile, parsed, render_snippet
from lora_scaffold.scan import ScannedClass
from lora_scaffold.workflow import Outcome, Report


PACKAGE_RECORD = f"{RECORD_DIR}/package.json"


@dataclass(frozen=True)
class Generated:
    """What became of one scanned class: its layer module, or why there is none."""

    scanned: ScannedClass
    module_name: str = ""
    layer_class: str = ""
    strategy: str = ""
    reason: str = ""
    error: str = ""


def layer_name_for(scanned: ScannedClass, taken: set[str]) -> str | None:
    """--name for the class's layer: None (the default) unless another class of the model already took that name."""
    class_name = scanned.qualified_name.split(" ")[0].rpartition(".")[2]
    _, module_name = layer_names(class_name, None)
    if module_name not in taken:
        taken.add(module_name)
        return None
    index = 2
    while f"{module_name}_{index}" in taken:
        index += 1
    taken.add(f"{module_name}_{index}")
    return f"{module_name.removeprefix('lora_')}_{index}"


def package_files(model: str, layers: list[str]) -> tuple[GeneratedFile, ...]:
    """DIR/__init__.py (one register for every layer), DIR/conftest.py (the tests import their layers by name), and
    the record of both, which says a later run may replace them while nobody edited them."""
    registers = "(" + ", ".join(f"register_{layer}" for layer in layers) + ("," if len(layers) == 1 else "") + ")"
    context = {
        "version": __version__,
        "layers": layers,
        "model_literal": json.dumps(model),
        "layers_literal": layout(repr(tuple(layers)).replace("'", '"'), 0, "LAYERS = "),
        "registers": layout(registers, 4, "for register_layer in ", ":"),
    }
    files = (
        parsed(GeneratedFile("__init__.py", render_snippet("partials/model_package.py.jinja", context))),
        parsed(GeneratedFile("conftest.py", render_snippet("partials/model_conftest.py.jinja", {}))),
    )
    record = {"model": model, "files": {f.path: digest(f.text) for f in files}, "layers": layers}
    return files + (GeneratedFile(PACKAGE_RECORD, json.dumps(record, indent=2) + "\n"),)


def package_changes(model: str, layers: list[str], output: Path, force: bool) -> tuple[FileChange, ...]:
    files = package_files(model, layers)
    changes = plan_changes(files, output, force=force, updatable=frozenset(_unedited(output)))
    refuse_conflicts(changes)
    return changes


def _unedited(output: Path) -> set[str]:
    path = output / PACKAGE_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"files": {}}
        recorded = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise WriteError(f"{path} is not a record lora-scaffold wrote; move it aside") from None
    unedited = {name for name, hash_ in recorded.items() if _digest_on_disk(output / name) == hash_}
    return unedited | {PACKAGE_RECORD}


def _digest_on_disk(path: Path) -> str | None:
    try:
        return digest(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def generate(
    model: str, output: Path, model_input: str | None = None, force: bool = False, dry_run: bool = False
) -> tuple[Outcome, tuple[Generated, ...], int]:
    """Every class `scan` gives a command for, generated into `output`, with the package files; one Outcome; and how
    many classes of the model hold weights."""
    if output.exists() and not output.is_dir():
        raise WriteError(f"-o {output}: exists and is not a folder")
    recovered = workflow.recover_interrupted(output, dry_run)
    every = workflow.scan_model(model, model_input)
    scanned = [s for s in every if s.command]
    taken: set[str] = set()
    results, changes = [], []
    for each in scanned:
        options = {"weight": each.weight, "name": layer_name_for(each, taken)}
        try:
            request = workflow.request_from_model(model, each.module, model_input, **options)
            outcome = workflow.new_plugin(request, output, force, dry_run=True)
        except ScaffoldError as error:
            results.append(Generated(each, error=str(error)))
            continue
        plan = outcome.report.plan
        results.append(Generated(each, plan.module_name, plan.layer_class, plan.strategy, plan.reason))
        changes += outcome.changes
    layers = [r.module_name for r in results if r.module_name]
    if layers:
        changes += package_changes(model, layers, output, force)
    return Outcome(output, tuple(changes), Report(notes=recovered)), tuple(results), len(every)
