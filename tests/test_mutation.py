"""Mutation testing's runner (issue 23) on a generated example: mutants run against the example's own suite."""

from pathlib import Path

import pytest

from lora_scaffold.mutation import run


EXAMPLES = Path(__file__).resolve().parent.parent / "generated_examples"


@pytest.mark.slow  # about 20 s: 14 mutants, each through the suite
def test_sign_and_scaling_mutants_of_a_generated_layer_all_fail_its_suite():
    outcomes, made = run(EXAMPLES / "gpt2_conv1d", jobs=2, operators=("sign", "scaling dropped", "scaling squared"))
    assert made == len(outcomes) >= 10
    assert [(o.mutant.where, o.mutant.change) for o in outcomes if not o.caught] == []
