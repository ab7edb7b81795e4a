"""The mutator of issue 23's mutation testing: before/after strings for each operator, on a small layer module."""

import ast

import pytest

from lora_scaffold.mutants import OPERATORS, layer_classes, mutants


SOURCE = """\
class Helper:
    def add(self, a, b):
        return a + b


class LoraThing(nn.Module, LoraLayer):
    def __repr__(self):
        return "lora." + super().__repr__()

    def merge(self, safe_merge=False):
        for adapter in self.active_adapters:
            if adapter not in self.r:
                continue
            delta = self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"NaNs in {adapter + 'x'}")
            self.weight.data += delta * self.scaling[adapter]
            self.merged_adapters.append(adapter)

    def delete(self, adapter):
        del self.r[adapter]
        return self.lora_bias.get(adapter, False)

    def record(self, adapter, r, rslora):
        self.r[adapter] = r
        return (self.weight.float() if rslora else self.weight).to(self.dtype)
"""


def made(operator):
    return [(m.where, m.change) for m in mutants(SOURCE, frozenset({"LoraThing"}), (operator,))]


def test_only_the_watched_class_is_mutated_and_never_its_repr_defaults_or_messages():
    every = mutants(SOURCE, frozenset({"LoraThing"}))
    assert every and all(m.where.startswith("LoraThing.") and "__repr__" not in m.where for m in every)
    assert all("safe_merge=False" in m.source for m in every)
    assert all("adapter + 'x'" in m.source for m in every if m.operator != "check dropped")
    for mutant in every:
        ast.parse(mutant.source)


@pytest.mark.parametrize(
    "operator, expected",
    [
        (
            "sign",
            [
                (
                    "LoraThing.merge, line 17",
                    "self.weight.data += delta * self.scaling[adapter] -> self.weight.data -= delta * self.scaling[adapter]",
                )
            ],
        ),
        ("scaling dropped", [("LoraThing.merge, line 17", "self.scaling[adapter] -> 1.0")]),
        ("scaling squared", [("LoraThing.merge, line 17", "self.scaling[adapter] -> (self.scaling[adapter] ** 2)")]),
        (
            "statement dropped",
            [
                ("LoraThing.merge, line 18", "self.merged_adapters.append(adapter) -> pass"),
                ("LoraThing.delete, line 21", "del self.r[adapter] -> pass"),
                ("LoraThing.record, line 25", "self.r[adapter] = r -> pass"),
            ],
        ),
        (
            "check dropped",
            [
                (
                    "LoraThing.merge, line 15",
                    "if safe_merge and not torch.isfinite(delta).all(): raise ... -> (no check)",
                )
            ],
        ),
        (
            "comparison",
            [("LoraThing.merge, line 12", "adapter not in self.r -> adapter in self.r")],
        ),
        ("boolean flipped", [("LoraThing.delete, line 22", "False -> True")]),
        (
            "cast dropped",
            [
                ("LoraThing.record, line 26", "self.weight.float() -> self.weight"),
                (
                    "LoraThing.record, line 26",
                    "(self.weight.float() if rslora else self.weight).to(self.dtype) -> "
                    "(self.weight.float() if rslora else self.weight)",
                ),
            ],
        ),
    ],
)
def test_each_operator_changes_one_site(operator, expected):
    assert made(operator) == expected


def test_a_negated_condition_keeps_its_parentheses():
    negated = mutants(SOURCE, frozenset({"LoraThing"}), ("condition negated",))
    assert [m.where for m in negated] == [
        "LoraThing.merge, line 12",
        "LoraThing.merge, line 15",
        "LoraThing.record, line 26",
    ]
    assert negated[0].key == "LoraThing.merge: if adapter not in self.r -> if not (...)"
    assert "if not (safe_merge and not torch.isfinite(delta).all()):" in negated[1].source
    assert "(self.weight.float() if not (rslora) else self.weight)" in negated[2].source


def test_every_operator_is_known_and_only_lora_layer_classes_are_mutated():
    assert len(set(OPERATORS)) == len(OPERATORS) == 9
    assert layer_classes(SOURCE) == {"LoraThing"}
