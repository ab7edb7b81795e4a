"""What patch mode adds to PEFT's own files, as `Edit`s: applied by `new`, reverted by `remove`."""

from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import asdict, dataclass

from lora_scaffold.files import GeneratedFile
from lora_scaffold.layer_plan import LayerPlan
from lora_scaffold.layout import LINE_LENGTH, layout
from lora_scaffold.patch.battery import BatteryEntry, battery_edit
from lora_scaffold.patch.battery_model import battery_entry
from lora_scaffold.patch.checkout import PeftCheckout
from lora_scaffold.patch.cst_utils import Edit, top_level_statements
from lora_scaffold.patch.dispatch import LAYER_FILE, DispatchBranch, dispatch_edit, read_chain
from lora_scaffold.patch.exports import export_edit
from lora_scaffold.patch.imports import import_edit
from lora_scaffold.patch.quantization import QUANTIZATION_FILE, BackendBranch, backend_edit
from lora_scaffold.patch.supported import MODEL_FILE, message_found, supported_edit


@dataclass(frozen=True)
class PatchEdits:
    """Everything `new` adds to files PEFT owns; kept in the generation record so `remove` can take it out."""

    branch: DispatchBranch
    needs_sys: bool
    module_name: str
    layer_class: str
    battery: BatteryEntry | None
    supported: str = ""  # the type named in model.py's "not supported" message ("" where it has another shape)
    backend: BackendBranch | None = None  # resolve_quantization_backend's branch for a quantized base

    def edits(self) -> tuple[Edit, ...]:
        edits = (import_edit("sys", LAYER_FILE),) if self.needs_sys else ()
        edits += (dispatch_edit(self.branch), export_edit(self.module_name, self.layer_class))
        edits += (supported_edit(self.supported),) if self.supported else ()
        if self.backend is not None:
            edits += (import_edit("sys", QUANTIZATION_FILE),) if "sys.modules" in self.backend.test else ()
            edits += (backend_edit(self.backend),)
        return edits + ((battery_edit(self.battery),) if self.battery else ())

    def as_dict(self) -> dict:
        return {
            "dispatch": {"test": self.branch.test, "body": self.branch.body, "layer_class": self.branch.layer_class},
            "import_sys": self.needs_sys,
            "export": {"module": self.module_name, "class": self.layer_class},
            "battery": self.battery.as_dict() if self.battery else None,
            "supported": self.supported,
            "backend": asdict(self.backend) if self.backend else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PatchEdits:
        battery = data["battery"]
        return cls(
            branch=DispatchBranch(**data["dispatch"]),
            needs_sys=data["import_sys"],
            module_name=data["export"]["module"],
            layer_class=data["export"]["class"],
            battery=BatteryEntry(**{**battery, "test_cases": tuple(battery["test_cases"])}) if battery else None,
            supported=data.get("supported", ""),  # records of older lora-scaffolds have none
            backend=BackendBranch(**data["backend"]) if data.get("backend") else None,
        )


def plan_edits(plan: LayerPlan, target_cls: type, checkout: PeftCheckout) -> PatchEdits:
    return PatchEdits(
        branch=dispatch_branch(plan, target_cls, checkout),
        needs_sys=not plan.target.in_torch,
        module_name=plan.names.module_name,
        layer_class=plan.names.layer_class,
        battery=None if plan.call.battery_blocker else battery_entry(plan, checkout.peft),
        supported=f"{plan.target.module}.{plan.target.class_name}" if _lists_supported(checkout) else "",
        backend=backend_branch(plan) if plan.decision.adds_quantization_backend(checkout.peft) else None,
    )


def backend_branch(plan: LayerPlan) -> BackendBranch:
    """`resolve_quantization_backend`'s branch returning the layer module's backend for the target."""
    test, _ = _isinstance_test(plan, "base_layer")
    backend = f"{plan.names.layer_class}Backend"
    body = f"from peft.tuners.lora.{plan.names.module_name} import {backend}\n\nreturn {backend}()"
    first, *continued = layout(test, 4, "if ", ":").split("\n")
    test = "\n".join([first, *(line.removeprefix("    ") for line in continued)])
    comment = f"{plan.target.class_name} (lora-scaffold: LoRA's {plan.names.layer_class}, and merging for every tuner)"
    return BackendBranch(test, body, backend, comment)


def _isinstance_test(plan: LayerPlan, variable: str) -> tuple[str, str]:
    """`isinstance(variable, Target)`, and the comment saying why it looks the class up (a target outside torch).
    A class PEFT adapts itself is taken only where it holds the target's tensors beside its weight."""
    if plan.target.in_torch:
        return f"isinstance({variable}, {plan.target.module}.{plan.target.class_name}){_holding(plan, variable)}", ""
    test = f'isinstance({variable}, getattr(sys.modules.get("{plan.target.module}"), "{plan.target.class_name}", ()))'
    why = f"Looked up in sys.modules: peft never imports {plan.target.module}, which may not be installed."
    return test + _holding(plan, variable), "".join(
        f"# {line}\n" for line in textwrap.wrap(why, DISPATCH_BODY_WIDTH - 2)
    )


def _holding(plan: LayerPlan, variable: str) -> str:
    """` and` the tensors beside the weight that set the target apart (compressed-tensors' weight_scale), or ""."""
    names = plan.weight.held_beside  # identifiers: analysis keeps no other
    if not names:
        return ""
    return "".join(f' and hasattr({variable}, "{name}")' for name in names)


def _lists_supported(checkout: PeftCheckout) -> bool:
    sources = checkout.edited_sources()
    return MODEL_FILE in sources and message_found(sources[MODEL_FILE])


def edited_sources(sources: dict[str, str], edits: PatchEdits) -> dict[str, str]:
    """The files the edits change, with the edits applied."""
    edited = dict(sources)
    for edit in edits.edits():
        edited[edit.path] = edit.apply(edited[edit.path])
    return edited


def reverted_sources(sources: dict[str, str], edits: PatchEdits, force: bool) -> dict[str, str]:
    reverted = dict(sources)
    for edit in reversed(edits.edits()):
        reverted[edit.path] = edit.revert(reverted[edit.path], force)
    return reverted


def as_files(sources: dict[str, str]) -> tuple[GeneratedFile, ...]:
    return tuple(GeneratedFile(path, text) for path, text in sources.items())


DISPATCH_BODY_WIDTH = LINE_LENGTH - 8  # the branch's body is indented twice


def dispatch_branch(plan: LayerPlan, target_cls: type, checkout: PeftCheckout) -> DispatchBranch:
    test, comment = _isinstance_test(plan, "target_base_layer")
    arguments = "config=config, **kwargs" if checkout.call_form == "config" else "**kwargs"
    body = (
        f"{comment}from .{plan.names.module_name} import {plan.names.layer_class}\n\n"
        f"new_module = {plan.names.layer_class}(target, adapter_name, {arguments})"
    )
    source = checkout.source(LAYER_FILE)
    bindings = _import_bindings(source)
    base_spellings = frozenset(
        spelling
        for spelling in read_chain(source).branch_types()
        if spelling and _is_base_class(_resolve_spelling(spelling, bindings), target_cls)
    )
    # Laid out as ruff would in dispatch_default's body (`    elif <test>:`), without that indentation, which
    # libcst gives the lines inside the parentheses again when it puts the branch there.
    first, *continued = layout(test, 4, "elif ", ":").split("\n")
    test = "\n".join([first, *(line.removeprefix("    ") for line in continued)])
    return DispatchBranch(test, body, plan.names.layer_class, base_spellings)


def _import_bindings(layer_source: str) -> dict[str, tuple[str, str | None]]:
    """What each module-level import of layer.py binds: name -> (module, attribute or None)."""
    bindings: dict[str, tuple[str, str | None]] = {}
    for node in top_level_statements(layer_source, LAYER_FILE):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                bindings[bound] = (alias.name if alias.asname else alias.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                bindings[alias.asname or alias.name] = (node.module, alias.name)
    return bindings


def _resolve_spelling(spelling: str, bindings: dict[str, tuple[str, str | None]]):
    """The class a branch's type spelling names in layer.py (`torch.nn.Conv2d`, `nn.Conv1d`, `Conv1D`), or None.

    Only modules already imported are looked in: a class from a module nobody imported cannot be a base class of
    the target (which is imported), and importing transformers just to find out would take seconds."""
    head, *rest = spelling.split(".")
    if head not in bindings:
        return None
    module_name, attribute = bindings[head]
    value = sys.modules.get(module_name)
    for name in ([attribute] if attribute else []) + rest:
        value = getattr(value, name, None)
    return value


def _is_base_class(candidate, target_cls: type) -> bool:
    return isinstance(candidate, type) and issubclass(target_cls, candidate)
