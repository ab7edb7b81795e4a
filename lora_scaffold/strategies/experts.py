"""`experts`: a weight that holds several experts' matrices, each used on its own (MoE blocks): stacked
`[experts, d1, d2]` (Mixtral), flattened along its rows `[experts * d1, d2]` with the expert count in an attribute
(DBRX), or one expert a row `[experts, d1 * d2]` where the forward is seen viewing a row as `[d1, d2]` and an
attribute gives d1 or d2. One rank-r factor pair per expert, laid out as PEFT's ParamWrapper lays them out."""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lora_scaffold.probe import Probe, dotted_attribute
from lora_scaffold.strategies.base import Evidence, Verdict
from lora_scaffold.strategies.delta import Delta


# Attributes MoE modules keep their expert count in (transformers: num_experts, num_local_experts, n_routed_experts,
# DBRX's moe_num_experts).
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts", "moe_num_experts")


class Experts(Delta):
    name = family = "experts"
    help = (
        "a weight of several experts, [E, d1, d2] or [E * d1, d2]: one rank-r pair per expert, the forward runs with "
        "W + dW"
    )
    summary = (
        "Forward runs the base module with `W + dW`, where expert e's slice of dW is `B_e @ A_e * scaling` (one "
        "rank-r pair per expert, stored as PEFT's ParamWrapper stores them: lora_A [E * r, d2], lora_B [d1, E * r])."
    )
    partial = "partials/experts.jinja"
    fallback = False

    def fits(self, evidence: Evidence) -> bool:
        shape = evidence.weight.shape
        if len(shape) == 3:
            return bool(expert_evidence(evidence.module, shape[0]))
        return len(shape) == 2 and any(row_view(evidence))

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        shape = evidence.weight.shape
        if len(shape) == 3 or (len(shape) == 2 and any(row_view(evidence))):
            return (Verdict(self, True, 0.0, "exact for any forward, one factor pair per expert"),)
        return (
            Verdict(
                self,
                False,
                float("inf"),
                "needs a weight [experts, d1, d2], [experts * d1, d2] with the expert count in an attribute, or "
                "[experts, d1 * d2] whose forward views a row as [d1, d2] with d1 or d2 in an attribute",
            ),
        )

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        shape = evidence.weight.shape
        attribute, view = row_view(evidence) if len(shape) == 2 else ("", None)
        if attribute:
            count = dotted_attribute(evidence.module, attribute)
            found = f"{count} experts' [{shape[0] // count}, {shape[1]}] slices along its rows (`{attribute}`)"
        elif view is not None:
            found = (
                f"{shape[0]} experts, one a row, which its forward views as [{view.rows}, {view.columns}] "
                f"(`{view.attribute}` = {view.rows if view.gives_rows else view.columns})"
            )
        else:
            found = f"{shape[0]} experts ({expert_evidence(evidence.module, shape[0]) or 'asked for'})"
        proven, proof = self.factored_path(evidence)
        if proven:
            how = f"; in training {proof}"
        else:
            how = f" ({proof}: no factored path)" if proof else ""
        return (
            f"a weight stacking {found}: one rank-r pair per expert, and the forward runs with W + dW, exact for "
            f"any forward{how}"
        )

    def changed_shape(self, evidence: Evidence) -> tuple[int, ...] | None:
        shape = evidence.weight.shape
        if len(shape) == 3:
            return tuple(shape)
        count = dotted_attribute(evidence.module, row_view(evidence)[0])
        return (count, shape[0] // count, shape[1])

    def unfactored(self, evidence: Evidence) -> str:
        if len(evidence.weight.shape) == 2 and not row_view(evidence)[0]:
            return "its experts are rows, which the forward views as matrices"
        return ""

    def template_answers(self, evidence: Evidence) -> dict:
        attribute, view = row_view(evidence) if len(evidence.weight.shape) == 2 else ("", None)
        return {
            "expert_count_attribute": json.dumps(attribute) if attribute else "",
            "expert_columns": _columns_code(view) if view else "",
        }


def expert_evidence(module: nn.Module, count: int) -> str:
    """Why the leading dimension counts experts ("" when nothing says so): an attribute, or the class's name."""
    for name in EXPERT_COUNTS:
        if getattr(module, name, None) == count:
            return f"`{name}` = {count}"
    class_name = type(module).__name__
    if "expert" in class_name.lower() or "moe" in class_name.lower():
        return f"the class is called {class_name}"
    return ""


def flattened_expert_count(module: nn.Module, weight_name: str, shape: tuple[int, ...]) -> str:
    """The attribute (dotted, from the target) giving the expert count E of a weight [E * d1, d2], d1 > 1, found
    on the target or on the module that holds the weight ("" when none does)."""
    owner = weight_name.rpartition(".")[0]
    for prefix in dict.fromkeys(("", owner)):
        holder = module.get_submodule(prefix)
        for name in EXPERT_COUNTS:
            count = getattr(holder, name, None)
            if isinstance(count, int) and count > 1 and shape[0] % count == 0 and shape[0] // count > 1:
                return f"{prefix}.{name}" if prefix else name
    return ""


@dataclass(frozen=True)
class BankView:
    """How the forward views a row of an [experts, d1 * d2] weight, and the attribute (dotted, from the target) that
    gives d1 (`gives_rows`) or d2 at run time, so that the layer also fits the class built at other sizes."""

    rows: int
    columns: int
    attribute: str
    gives_rows: bool


# What a forward may do to the weight before viewing a row as a matrix: select rows, convert, copy.
SELECTIONS = frozenset(
    {
        *(torch.Tensor.__getitem__, torch.Tensor.select, torch.select, torch.Tensor.unbind, torch.unbind),
        *(torch.Tensor.narrow, torch.narrow, torch.Tensor.index_select, torch.index_select),
        *(torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split),
        *(torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.float, torch.Tensor.clone, torch.Tensor.type_as),
    }
)
VIEWS = frozenset(
    {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten}
    | {torch.Tensor.view_as, torch.Tensor.reshape_as}
)


class RowViews(TorchFunctionMode):
    """Sees the shapes [..., d1, d2] (d1 * d2 = the row's length) that rows of the weight are viewed as."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.row = weight.shape[-1]
        self.derived = {id(weight)}
        self.kept = [weight]  # alive, so that their ids are not reused
        self.views: set[tuple[int, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if not isinstance(source, torch.Tensor) or id(source) not in self.derived:
            return result
        if func in VIEWS and isinstance(result, torch.Tensor) and source.shape[-1] == self.row and result.dim() >= 2:
            rows, columns = result.shape[-2:]
            if rows * columns == self.row and rows > 1 and columns > 1:
                self.views.add((rows, columns))
        elif func in SELECTIONS:
            for derived in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(derived, torch.Tensor):
                    self.derived.add(id(derived))
                    self.kept.append(derived)
        return result


def _columns_code(view: BankView) -> str:
    """Experts one a row: the code giving d2 of a row's [d1, d2] view at run time, from the attribute found."""
    read = f"_get_attribute(module, {json.dumps(view.attribute)})"
    return f"shape[1] // {read}" if view.gives_rows else read


def row_view(evidence: Evidence) -> tuple[str, BankView | None]:
    """How a 2-D weight holds its experts: the attribute counting them along its rows ([E * d1, d2]), else the
    view of one a row ([E, d1 * d2]); ("", None) when neither is found."""
    attribute = flattened_expert_count(evidence.module, evidence.weight.name, evidence.weight.shape)
    return attribute, None if attribute else bank_view(evidence)


def bank_view(evidence: Evidence) -> BankView | None:
    """The view of an [experts, d1 * d2] weight's rows its forward takes (None unless the leading dimension is
    the expert count, the forward views every row it uses one way, and an attribute gives d1 or d2)."""
    shape = evidence.weight.shape
    if len(shape) != 2 or evidence.probe is None or not expert_evidence(evidence.module, shape[0]):
        return None
    views = observed_row_views(evidence.probe)
    if len(views) != 1:
        return None
    ((rows, columns),) = views
    found = size_attribute(evidence.module, evidence.weight.name, columns) or size_attribute(
        evidence.module, evidence.weight.name, rows
    )
    if not found:
        return None
    return BankView(rows, columns, found, gives_rows=dotted_attribute(evidence.module, found) != columns)


def observed_row_views(probe: Probe) -> set[tuple[int, int]]:
    """Watched once per probe: fits, judge, reason and the plan all ask."""
    if probe not in _ROW_VIEWS:
        watcher = RowViews(probe.weight)
        try:
            probe.watch(watcher)
        except Exception:  # noqa: BLE001 - the probe ran this forward already; whatever fails here tells nothing
            watcher.views.clear()
        _ROW_VIEWS[probe] = frozenset(watcher.views)
    return set(_ROW_VIEWS[probe])


_ROW_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def size_attribute(module: nn.Module, weight_name: str, size: int) -> str:
    """An int attribute equal to `size` (dotted, from the target): of the target, of the weight's owner, or of
    their `config`; never an expert count ("" when none is)."""
    owner = weight_name.rpartition(".")[0]
    for prefix in dict.fromkeys(("", owner)):
        holder = module.get_submodule(prefix)
        for path, where in ((prefix, holder), (f"{prefix}.config".lstrip("."), getattr(holder, "config", None))):
            attributes = vars(where) if where is not None and hasattr(where, "__dict__") else {}
            for name, value in sorted(attributes.items()):
                if type(value) is int and value == size and name not in EXPERT_COUNTS and _public(name):
                    return f"{path}.{name}" if path else name
    return ""


def _public(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_")


EXPERTS = Experts()
