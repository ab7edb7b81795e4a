"""libcst transforms as before/after source strings, with no-change cases."""

import ast
import random
from textwrap import dedent

import pytest

from lora_scaffold.errors import PatchError
from lora_scaffold.patch import battery as battery_module
from lora_scaffold.patch import cst_utils, dispatch, imports, supported
from lora_scaffold.patch.battery import (
    BATTERY_FILE,
    BatteryEntry,
    add_battery_entry,
    battery_edit,
    remove_battery_entry,
)
from lora_scaffold.patch.cst_utils import Edit, excerpt
from lora_scaffold.patch.dispatch import (
    LAYER_FILE,
    DispatchBranch,
    call_form,
    dispatch_edit,
    insert_branch,
    remove_branch,
)
from lora_scaffold.patch.exports import add_export, export_edit
from lora_scaffold.patch.imports import add_import, import_edit, remove_import_if_unused
from lora_scaffold.patch.quantization import BackendBranch, backend_edit, insert_backend, remove_backend


def assert_edit(edit: Edit, before: str, after: str | None = None) -> str:
    """The edit turns `before` into `after` (when given), is idempotent, and reverts to `before` byte for byte."""
    applied = edit.apply(before)
    if after is not None:
        assert applied == after
    assert applied != before
    assert edit.apply(applied) == applied
    assert edit.revert(applied, False) == before
    assert edit.revert(before, False) == before
    return applied


NEW_STYLE = dedent(
    """\
    import math

    import torch
    from torch import nn


    def dispatch_default(target, adapter_name, config, parameter_name=None, **kwargs):
        new_module = None

        if isinstance(target, BaseTunerLayer):
            target_base_layer = target.get_base_layer()
        else:
            target_base_layer = target

        if parameter_name is not None:
            new_module = ParamWrapper(target, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
        elif isinstance(target_base_layer, torch.nn.Conv2d):
            new_module = Conv2d(target, adapter_name, config=config, **kwargs)
        elif isinstance(target_base_layer, torch.nn.Linear):
            new_module = Linear(target, adapter_name, config=config, **kwargs)

        return new_module
    """
)

# peft 0.13 - 0.16: `lora_config`, no parameter_name branch, layers built from **kwargs.
OLD_STYLE = dedent(
    """\
    def dispatch_default(target, adapter_name, lora_config, **kwargs):
        new_module = None

        if isinstance(target, BaseTunerLayer):
            target_base_layer = target.get_base_layer()
        else:
            target_base_layer = target

        if isinstance(target_base_layer, torch.nn.Embedding):
            embedding_kwargs = kwargs.copy()
            new_module = Embedding(target, adapter_name, **embedding_kwargs)
        elif isinstance(target_base_layer, torch.nn.Conv2d):
            kwargs.update(lora_config.loftq_config)
            new_module = Conv2d(target, adapter_name, **kwargs)

        return new_module
    """
)

CONVT = DispatchBranch(
    "isinstance(target_base_layer, torch.nn.ConvTranspose2d)",
    "from .lora_convt import LoraConvT\n\nnew_module = LoraConvT(target, adapter_name, config=config, **kwargs)",
    "LoraConvT",
)


def test_branch_goes_at_the_end_when_no_branch_catches_the_target():
    assert_edit(
        dispatch_edit(CONVT),
        NEW_STYLE,
        NEW_STYLE.replace(
            "        new_module = Linear(target, adapter_name, config=config, **kwargs)\n",
            "        new_module = Linear(target, adapter_name, config=config, **kwargs)\n"
            "    elif isinstance(target_base_layer, torch.nn.ConvTranspose2d):\n"
            "        from .lora_convt import LoraConvT\n\n"
            "        new_module = LoraConvT(target, adapter_name, config=config, **kwargs)\n",
        ),
    )


def test_subclass_branch_goes_before_the_branch_of_its_base_class():
    branch = DispatchBranch(
        "isinstance(target_base_layer, MyConv)",
        "new_module = LoraMyConv(target)",
        "LoraMyConv",
        frozenset({"torch.nn.Conv2d"}),
    )
    after = assert_edit(dispatch_edit(branch), NEW_STYLE)
    assert (
        "config=config, **kwargs)\n"
        "    elif isinstance(target_base_layer, MyConv):\n"
        "        new_module = LoraMyConv(target)\n"
        "    elif isinstance(target_base_layer, torch.nn.Conv2d):\n"
    ) in after
    assert after.index("MyConv)") > after.index("parameter_name is not None")


def test_peft_own_branch_for_the_same_type_is_not_ours():
    linear = DispatchBranch(
        "isinstance(target_base_layer, torch.nn.Linear)", "new_module = LoraLinear(target)", "LoraLinear"
    )
    after = assert_edit(dispatch_edit(linear), NEW_STYLE)
    assert after.count("isinstance(target_base_layer, torch.nn.Linear)") == 2


def test_old_style_chain_first_position_keeps_the_blank_line():
    branch = DispatchBranch(
        "isinstance(target_base_layer, MyEmb)",
        "new_module = LoraMyEmb(target, adapter_name, **kwargs)",
        "LoraMyEmb",
        frozenset({"torch.nn.Embedding"}),
    )
    after = assert_edit(dispatch_edit(branch), OLD_STYLE)
    assert (
        "        target_base_layer = target\n\n"
        "    if isinstance(target_base_layer, MyEmb):\n"
        "        new_module = LoraMyEmb(target, adapter_name, **kwargs)\n"
        "    elif isinstance(target_base_layer, torch.nn.Embedding):\n"
    ) in after
    assert (call_form(OLD_STYLE), call_form(NEW_STYLE)) == ("kwargs", "config")


def test_a_branch_the_user_edited_is_not_removed_without_force():
    edited = insert_branch(NEW_STYLE, CONVT).replace(
        "**kwargs)\n\n    return", "**kwargs)\n        print(1)\n\n    return"
    )
    with pytest.raises(PatchError, match="was edited; pass --force"):
        remove_branch(edited, CONVT, force=False)
    assert remove_branch(edited, CONVT, force=True) == NEW_STYLE


def test_missing_dispatch_default_is_explained():
    with pytest.raises(PatchError, match="no module-level function dispatch_default"):
        insert_branch("def something_else():\n    pass\n", CONVT)
    with pytest.raises(PatchError, match="no if/elif chain on target_base_layer"):
        insert_branch("def dispatch_default(target, adapter_name, config):\n    return None\n", CONVT)


def test_import_sys_lands_in_order_and_leaves_when_unused():
    after = assert_edit(import_edit("sys", "layer.py"), NEW_STYLE)
    assert after.startswith("import math\nimport sys\n\nimport torch\n")
    used = after + "\nprint(sys.argv)\n"
    assert remove_import_if_unused(used, "sys", "layer.py") == used


INIT = dedent(
    """\
    from .config import LoraConfig
    from .layer import Conv2d, LoraLayer
    from .model import LoraModel


    __all__ = [
        "Conv2d",
        "LoraConfig",
        "LoraLayer",
        "LoraModel",
    ]
    """
)


def test_export_is_imported_and_listed_in_sorted_position():
    assert_edit(
        export_edit("lora_convt", "LoraConvT"),
        INIT,
        dedent(
            """\
        from .config import LoraConfig
        from .layer import Conv2d, LoraLayer
        from .lora_convt import LoraConvT
        from .model import LoraModel


        __all__ = [
            "Conv2d",
            "LoraConfig",
            "LoraConvT",
            "LoraLayer",
            "LoraModel",
        ]
        """
        ),
    )


def test_export_at_the_end_of_all():
    after = assert_edit(export_edit("zeta", "Zeta"), INIT)
    assert '    "LoraModel",\n    "Zeta",\n]' in after


def test_checkouts_that_do_not_look_as_expected_are_explained():
    with pytest.raises(PatchError, match="no `__all__ = \\[...\\]` list"):
        add_export("from .config import LoraConfig\n", "zeta", "Zeta")
    with pytest.raises(PatchError, match="fewer than two entries"):
        add_export('from .config import LoraConfig\n\n__all__ = ["LoraConfig"]\n', "zeta", "Zeta")
    with pytest.raises(PatchError, match="no plain `import x` lines"):
        add_import("from torch import nn\n", "sys", "layer.py")
    with pytest.raises(PatchError, match="has no from_pretrained"):
        add_battery_entry(BATTERY.replace("def from_pretrained", "def other"), ENTRY)


BATTERY = dedent(
    """\
    TEST_CASES = [
        ("Vanilla MLP 1 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"]}),
        ("Conv2d 1 LoRA", "Conv2d", LoraConfig, {"target_modules": ["conv2d"]}),
    ]


    class MLP(nn.Module):
        pass


    class MockTransformerWrapper:
        @classmethod
        def from_pretrained(cls, model_id, dtype=None):
            if model_id == "MLP":
                return MLP().to(dtype)

            raise ValueError(f"model_id {model_id} not implemented")
    """
)

ENTRY = BatteryEntry(
    model_id="LoraConvT",
    model_class="ModelLoraConvT",
    class_code="class ModelLoraConvT(nn.Module):\n    pass\n",
    test_cases=('("ConvT 1 LoRA", "LoraConvT", LoraConfig, {"target_modules": ["target"]})',),
)


def test_battery_gets_model_class_wrapper_branch_and_test_cases():
    assert_edit(
        battery_edit(ENTRY),
        BATTERY,
        dedent(
            """\
        TEST_CASES = [
            ("Vanilla MLP 1 LoRA", "MLP", LoraConfig, {"target_modules": ["lin0"]}),
            ("Conv2d 1 LoRA", "Conv2d", LoraConfig, {"target_modules": ["conv2d"]}),
            ("ConvT 1 LoRA", "LoraConvT", LoraConfig, {"target_modules": ["target"]}),
        ]


        class MLP(nn.Module):
            pass


        class ModelLoraConvT(nn.Module):
            pass


        class MockTransformerWrapper:
            @classmethod
            def from_pretrained(cls, model_id, dtype=None):
                if model_id == "MLP":
                    return MLP().to(dtype)

                if model_id == "LoraConvT":
                    return ModelLoraConvT().to(dtype)

                raise ValueError(f"model_id {model_id} not implemented")
        """
        ),
    )


def test_edited_battery_model_is_not_removed_without_force():
    edited = add_battery_entry(BATTERY, ENTRY).replace(
        "class ModelLoraConvT(nn.Module):\n    pass", "class ModelLoraConvT(nn.Module):\n    x = 1"
    )
    with pytest.raises(PatchError, match="ModelLoraConvT in tests/test_custom_models.py was edited"):
        remove_battery_entry(edited, ENTRY, force=False)
    assert remove_battery_entry(edited, ENTRY, force=True) == BATTERY


PEFT_FILES = (
    "src/peft/tuners/lora/layer.py",
    "src/peft/tuners/lora/__init__.py",
    "src/peft/tuners/lora/model.py",
    "tests/test_custom_models.py",
)


@pytest.mark.parametrize("path", PEFT_FILES)
def test_excerpts_of_peft_files_give_the_source_back_whatever_they_parse(pristine, path):
    source = (pristine / path).read_text()
    statements = ast.parse(source).body
    methods = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)]
    chosen = random.Random(0).sample(range(len(statements)), len(statements) // 3)
    picks = [lambda s: False, lambda s: True, lambda s: isinstance(s, ast.ClassDef), lambda s: s in picked]
    picked = [statements[i] for i in chosen]
    some_methods = {node.name for node in random.Random(1).sample(methods, len(methods) // 3)}
    for wanted in picks:
        # Of the classes wanted, all their methods, none, or some (by name: the tree parsed again is another)
        for wanted_method in (None, lambda m: False, lambda m: True, lambda m: m.name in some_methods):
            view = excerpt(source, path, wanted, wanted_method)
            assert view.code(view.module) == source


def test_edits_on_an_excerpt_equal_edits_on_the_whole_parse(pristine, monkeypatch):
    # The transforms on excerpts, then on the whole file parsed (every statement wanted): byte-identical results.
    layer = (pristine / LAYER_FILE).read_text()
    battery = (pristine / BATTERY_FILE).read_text()
    branch = DispatchBranch("isinstance(target_base_layer, MyConv)", "new_module = LoraMyConv(target)", "LoraMyConv")
    model = (pristine / supported.MODEL_FILE).read_text()
    edits = [(dispatch_edit(branch), layer), (battery_edit(ENTRY), battery), (import_edit("sys", LAYER_FILE), layer)]
    edits.append((supported.supported_edit("mypkg.MyConv"), model))
    on_excerpts = [edit.apply(source) for edit, source in edits]
    whole = cst_utils.excerpt
    for module in (dispatch, battery_module, imports, supported):
        monkeypatch.setattr(module, "excerpt", lambda source, filename, *wanted: whole(source, filename, bool))
    assert [edit.apply(source) for edit, source in edits] == on_excerpts
    for (edit, source), applied in zip(edits, on_excerpts):
        assert applied != source and edit.revert(applied, False) == source


def test_battery_cases_are_named_as_peft_names_its_own():
    from test_analyse import plan_for

    from lora_scaffold.patch.battery_model import battery_entry
    from lora_scaffold.peft_release import PATCH, PeftRelease

    entry = battery_entry(
        plan_for("torch.nn.Bilinear", {"in1_features": 5, "in2_features": 7}), PeftRelease(PATCH, (0, 21, 2))
    )
    names = [ast.parse(case, mode="eval").body.elts[0].value for case in entry.test_cases]
    assert names[:3] == ["Bilinear 1 LoRA", "Bilinear 2 LoRA", "Bilinear 3 LoRA with rslora"]
    assert "Bilinear 4 LoRA with dropout" in names and not any("lora-scaffold" in name for name in names)


MODEL_SOURCE = """class LoraModel(BaseTuner):
    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if new_module is None:
            # no module could be matched
            raise ValueError(
                f"Target module {target} is not supported. Currently, only the following modules are supported: "
                "`torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, `torch.nn.Conv3d`, "
                "`transformers.pytorch_utils.Conv1D`, `torch.nn.MultiheadAttention.`."
            )
        return new_module
"""


def test_the_not_supported_message_names_the_new_type_and_gives_it_back():
    from lora_scaffold.patch.supported import add_supported, message_found, remove_supported

    added = add_supported(MODEL_SOURCE, "mypkg.MyConv")
    assert added == MODEL_SOURCE.replace(
        '                "`transformers.pytorch_utils.Conv1D`',
        '                "`mypkg.MyConv`, "\n                "`transformers.pytorch_utils.Conv1D`',
    )
    assert add_supported(added, "mypkg.MyConv") == added  # again: no change
    both = add_supported(added, "transformers.models.mixtral.modeling_mixtral.MixtralExperts")
    assert remove_supported(both, "mypkg.MyConv") == add_supported(
        MODEL_SOURCE, "transformers.models.mixtral.modeling_mixtral.MixtralExperts"
    )
    assert remove_supported(added, "mypkg.MyConv") == MODEL_SOURCE
    assert remove_supported(MODEL_SOURCE, "mypkg.MyConv") == MODEL_SOURCE
    other = MODEL_SOURCE.replace("Currently, only", "Only")
    assert not message_found(other) and add_supported(other, "mypkg.MyConv") == other


QUANTIZATION_SOURCE = dedent(
    """\
    import copy


    def resolve_quantization_backend(base_layer, **kwargs):
        \"\"\"Which backend.\"\"\"
        if is_hqq_available():
            if isinstance(base_layer, HQQLinear):
                return HqqBackend()

        # Not quantized
        return None


    def quantization_extra_repr(module):
        return ""
    """
)
QLINEAR_BACKEND = BackendBranch(
    'isinstance(base_layer, getattr(sys.modules.get("optimum.quanto.nn"), "QLinear", ()))',
    "from peft.tuners.lora.lora_qlinear import LoraQLinearBackend\n\nreturn LoraQLinearBackend()",
    "LoraQLinearBackend",
    "QLinear (lora-scaffold)",
)


def test_a_quantization_backend_branch_goes_after_peft_s_own_before_not_quantized():
    assert_edit(
        backend_edit(QLINEAR_BACKEND),
        QUANTIZATION_SOURCE,
        QUANTIZATION_SOURCE.replace(
            "            return HqqBackend()\n\n",
            "            return HqqBackend()\n\n"
            "    # QLinear (lora-scaffold)\n"
            '    if isinstance(base_layer, getattr(sys.modules.get("optimum.quanto.nn"), "QLinear", ())):\n'
            "        from peft.tuners.lora.lora_qlinear import LoraQLinearBackend\n\n"
            "        return LoraQLinearBackend()\n\n",
        ),
    )


def test_an_edited_backend_branch_is_not_removed_without_force():
    edited = insert_backend(QUANTIZATION_SOURCE, QLINEAR_BACKEND).replace(
        "return LoraQLinearBackend()", "return LoraQLinearBackend(strict=True)"
    )
    with pytest.raises(PatchError, match="was edited; pass --force"):
        remove_backend(edited, QLINEAR_BACKEND, force=False)
    assert remove_backend(edited, QLINEAR_BACKEND, force=True) == QUANTIZATION_SOURCE
    with pytest.raises(PatchError, match="has no module-level function resolve_quantization_backend"):
        insert_backend("import copy\n", QLINEAR_BACKEND)
