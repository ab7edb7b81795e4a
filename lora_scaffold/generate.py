"""`scan MODEL --generate -o DIR`: a layer and its suite for every class of the model that holds a weight LoRA can
adapt and PEFT cannot (one for each such weight of the class), each taken from the model (`new --from-model`), and
DIR/__init__.py with one `register(config)` for all of them, which stacks a class's layers on its modules. The whole
folder is one change: written all at once, or not at all."""

from __future__ import annotations

import json
import keyword
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from importlib.metadata import packages_distributions
from pathlib import Path

from lora_scaffold import __version__, workflow
from lora_scaffold.errors import NotCalled, ScaffoldError, WeightUnused, WriteError
from lora_scaffold.files import GeneratedFile
from lora_scaffold.layout import layout
from lora_scaffold.names import layer_names
from lora_scaffold.record import RECORD_DIR, digest
from lora_scaffold.render import parsed, render_snippet
from lora_scaffold.scan import ScannedClass, build_model
from lora_scaffold.workflow import Outcome, Report


PACKAGE_RECORD = f"{RECORD_DIR}/package.json"


@dataclass(frozen=True)
class Generated:
    """What became of one scanned class: its layer module, or why there is none."""

    scanned: ScannedClass  # its `weight` is the one this layer adapts
    module_name: str = ""
    layer_class: str = ""
    strategy: str = ""
    reason: str = ""
    error: str = ""
    target: tuple[str, str] = ("", "")  # (module, class) the layer is for, as its generated module imports it


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


def _layer_for(
    model: str, scanned: ScannedClass, model_input, taken: set[str], targeted: set[str], output: Path, force: bool
) -> tuple[ScannedClass, Outcome]:
    """The layer for the instance scan named; where the model never calls that instance (T5's `shared`, which the
    encoder reaches as `embed_tokens`), for the next instance of the same shapes; where the instance's forward does
    not read the weight but its parent's does (DBRX's experts pass their `mlp` its weights), for the parent."""
    try:
        return scanned, _new_layer(model, scanned, model_input, taken, output, force)
    except NotCalled as not_called:
        for other in _other_instances(scanned):
            try:
                return other, _new_layer(model, other, model_input, taken, output, force)
            except NotCalled:
                continue
        raise not_called
    except WeightUnused:
        parent = _reading_parent(model, scanned, targeted)
        if parent is None:
            raise
        return parent, _new_layer(model, parent, model_input, taken, output, force)


def _new_layer(
    model: str, scanned: ScannedClass, model_input, taken: set[str], output: Path, force: bool, name: str | None = None
) -> Outcome:
    """The class's layer (a dry run: written with the rest); its module's name taken only when it is made."""
    names = set(taken)
    if name is None:
        name = layer_name_for(scanned, names)
    else:
        names.add(f"lora_{name}")
    options = {"weight": scanned.weight, "name": name}
    request = workflow.request_from_model(model, scanned.module, model_input, **options)
    outcome = workflow.new_plugin(request, output, force, dry_run=True)
    taken.update(names)
    return outcome


def _layers_for_class(
    model: str, scanned: ScannedClass, model_input, taken: set[str], targeted: set[str], output: Path, force: bool
) -> list[tuple[Generated, tuple]]:
    """A layer for each weight of the class LoRA could adapt: the first whose layer is made (scan's choice first)
    wraps the module, and the others' stack on it; each weight whose layer is not made says why."""
    made = []
    weights = (scanned.weight, *scanned.unadapted)
    for index, weight in enumerate(weights):
        tried = replace(scanned, weight=weight, unadapted=weights[index + 1 :])
        try:
            where, outcome = _layer_for(model, tried, model_input, taken, targeted, output, force)
        except ScaffoldError as error:
            made.append((Generated(replace(tried, unadapted=()), error=str(error)), ()))
            continue
        first = _generated(where, outcome)
        made.append((replace(first, scanned=replace(where, unadapted=())), outcome.changes))
        return made + _layers_for_other_weights(model, first, model_input, taken, output, force)
    return made


def _layers_for_other_weights(
    model: str, first: Generated, model_input, taken: set[str], output: Path, force: bool
) -> list[tuple[Generated, tuple]]:
    """A layer for each other weight of the class LoRA could adapt (an expert bank's `down_proj` beside its
    `gate_up_proj`), each proven by the probe on its own; the package stacks them on the class's modules. Named after
    the first layer and the weight (`lora_mixtral_experts_down_proj`)."""
    made = []
    for weight in first.scanned.unadapted:
        scanned = replace(first.scanned, weight=weight, unadapted=())
        suffix = re.sub(r"\W", "_", weight).lower()
        name = _unique(f"{first.module_name.removeprefix('lora_')}_{suffix}", taken)
        try:
            outcome = _new_layer(model, scanned, model_input, taken, output, force, name=name)
        except ScaffoldError as error:
            made.append((Generated(scanned, error=str(error)), ()))
            continue
        chosen = outcome.report.plan.decision.chosen
        if not chosen.stacks:
            why = f"its layer ({chosen.name}) cannot stack on the layer for {first.scanned.weight}"
            made.append((Generated(scanned, error=f"{why}: only a layer running the module with W + dW does"), ()))
            continue
        made.append((_generated(scanned, outcome), outcome.changes))
    return made


def _unique(name: str, taken: set[str]) -> str:
    index, unique = 2, name
    while f"lora_{unique}" in taken:
        unique, index = f"{name}_{index}", index + 1
    return unique


def _generated(scanned: ScannedClass, outcome: Outcome) -> Generated:
    plan = outcome.report.plan
    return Generated(
        scanned,
        plan.names.module_name,
        plan.names.layer_class,
        plan.decision.strategy,
        plan.decision.reason,
        target=(plan.target.module, plan.target.class_name),
    )


def _other_instances(scanned: ScannedClass):
    """The class's other instances whose weights have the shapes of the one scan named (not through a parent)."""
    if scanned.module != scanned.example:
        return
    for variant in scanned.variants:
        if scanned.example in variant.instances:
            yield from (
                replace(scanned, example=name, module=name) for name in variant.instances if name != scanned.example
            )


def _reading_parent(model: str, scanned: ScannedClass, targeted: set[str]) -> ScannedClass | None:
    """The same weight, named from the module's parent, unless the parent is the model or has a layer of its own."""
    parent, _, child = scanned.module.rpartition(".")
    if not parent or parent in targeted:
        return None
    cls = type(build_model(model).get_submodule(parent))
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    return replace(
        scanned,
        qualified_name=qualified,
        example=parent,
        module=parent,
        weight=f"{child}.{scanned.weight}",
        unadapted=tuple(f"{child}.{other}" for other in scanned.unadapted),
    )


def package_files(model: str, made: list[Generated]) -> tuple[GeneratedFile, ...]:
    """DIR/__init__.py (one register for every layer; a class with a layer for each of several weights gets them
    stacked on its modules), DIR/conftest.py (the tests import their layers by name), and the record of both, which
    says a later run may replace them while nobody edited them."""
    by_target: dict[tuple[str, str], list[Generated]] = {}
    for generated in made:
        by_target.setdefault(generated.target, []).append(generated)
    alone = [group[0].module_name for group in by_target.values() if len(group) == 1]
    stacks = [group for group in by_target.values() if len(group) > 1]
    aliases = _target_aliases([group[0].target for group in stacks])
    layers = sorted(generated.module_name for generated in made)
    registers = "(" + ", ".join(f"register_{layer}" for layer in alone) + ("," if len(alone) == 1 else "") + ")"
    stacked = ", ".join(
        f"{aliases[group[0].target]}: ({', '.join(g.layer_class for g in group)},)" for group in stacks
    )
    context = {
        "version": __version__,
        "alone": sorted(alone),
        "stacked_imports": sorted({(g.module_name, g.layer_class) for group in stacks for g in group}),
        "target_imports": sorted(
            (module, name if aliases[(module, name)] == name else f"{name} as {aliases[(module, name)]}")
            for module, name in aliases
        ),
        "model_literal": json.dumps(model),
        "layers_literal": layout(repr(tuple(layers)).replace("'", '"'), 0, "LAYERS = "),
        "registers": layout(registers, 4, "for register_layer in ", ":") if alone else "",
        "stacked": layout("{" + stacked + "}", 0, "STACKED = ") if stacks else "",
    }
    files = (
        parsed(GeneratedFile("__init__.py", render_snippet("partials/model_package.py.jinja", context))),
        parsed(GeneratedFile("conftest.py", render_snippet("partials/model_conftest.py.jinja", {}))),
    )
    record = {"model": model, "files": {f.path: digest(f.text) for f in files}, "layers": layers}
    return files + (GeneratedFile(PACKAGE_RECORD, json.dumps(record, indent=2) + "\n"),)


def _target_aliases(targets: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The name each stacked class is imported as in the package: its own, unless two classes share it."""
    counts = Counter(name for _, name in targets)
    return {
        (module, name): name if counts[name] == 1 else f"{name}_{index}"
        for index, (module, name) in enumerate(targets, 1)
    }


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


def _check_package_name(output: Path) -> None:
    """DIR becomes a package the user imports (`from DIR import register`) and the suites import through: its name
    must be one Python can import, and must not hide an installed module of that name (`peft`, `test`)."""
    name = output.resolve().name
    if not name.isidentifier() or keyword.iskeyword(name):
        usable = re.sub(r"\W", "_", name)
        if usable[:1].isdigit():
            usable = f"layers_{usable}"
        elif keyword.iskeyword(usable):
            usable = f"{usable}_layers"
        raise WriteError(
            f"-o {output}: --generate writes a Python package, and {name!r} is not a name Python imports "
            f"(`from {name} import register`); name the folder like {usable!r}"
        )
    # What the installed distributions provide, not whatever this process's sys.path happens to find.
    if name in sys.stdlib_module_names or name in packages_distributions():
        raise WriteError(
            f"-o {output}: a package named {name!r} would hide the installed module {name!r} from the generated "
            "suites and from your code; name the folder otherwise"
        )


def generate(
    model: str, output: Path, model_input: str | None = None, force: bool = False, dry_run: bool = False
) -> tuple[Outcome, tuple[Generated, ...], int]:
    """Every class `scan` gives a command for, generated into `output`, with the package files; one Outcome; and how
    many classes of the model hold weights."""
    if output.exists() and not output.is_dir():
        raise WriteError(f"-o {output}: exists and is not a folder")
    _check_package_name(output)
    run = workflow.Run.start(output, force, dry_run)
    every = workflow.scan_model(model, model_input)
    scanned = [s for s in every if s.command]
    taken: set[str] = set()
    results, changes = [], []
    targeted = {s.module for s in scanned}
    for each in scanned:
        for result, class_changes in _layers_for_class(model, each, model_input, taken, targeted, output, force):
            results.append(result)
            changes += class_changes
    made = [r for r in results if r.module_name]
    if made:
        changes += run.changes(package_files(model, made), _unedited(output))
    return Outcome(output, tuple(changes), Report(notes=run.recovered)), tuple(results), len(every)
