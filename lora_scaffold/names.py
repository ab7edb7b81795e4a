"""Every name lora-scaffold puts into generated code: validated identifiers that cannot shadow one another."""

from __future__ import annotations

import ast
import json
import keyword
import re

from lora_scaffold.errors import AnalysisError


# The module-level names generated layer modules and tests bind (imports, constants, helpers): a target class or a
# layer class of one of these names would shadow it. tests/test_names.py keeps this list complete.
GENERATED_NAMES = frozenset(
    {
        *("annotations", "copy", "math", "pytest", "torch", "nn", "F", "warnings", "Any", "Optional"),
        *("functional_call", "SimpleNamespace", "check_adapters_to_merge", "PeftWarning"),
        *(
            "LoraConfig",
            "LoraLayer",
            "PeftModel",
            "get_peft_model",
            "register",
            "ParamWrapper",
            "_layer_or_param_wrapper",
        ),
        *("DoraLinearVariant", "DoraConv1dVariant", "DoraConv2dVariant", "DoraConv3dVariant"),
        *("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention"),
        *("WEIGHT_NAME", "BIAS_NAME", "SUPPORTED_INITS", "VARIANT_SUPPORT", "FLAT_WEIGHTS_WARNING", "_get_attribute"),
        *("_computes_in_fp32", "_weight_shape", "gather_params_ctx", "_no_fused_path", "parametrize"),
        *("RANK", "RTOL", "ATOL", "Wrapper", "make_target", "make_inputs", "make_base", "make_config", "make_model"),
        *("cast", "tensors", "flatten", "floating", "run", "assert_close", "load_saved", "lora_layer", "base_weight"),
        *("base_state", "nudge", "moved", "LAYER_FILE", "layer_warnings", "warnings", "stacked", "stacked_output"),
        "_module_below_layers",  # a layer that stacks on others of its module (scan --generate)
        *("contextlib", "functools", "inspect", "Captured", "recorded_call", "captured_call"),
        "LayerUnderTest",  # the layer `verify` checks
        # the factored path's mode and helpers (lora_scaffold/factored.py's layer_source)
        *("TorchFunctionMode", "FactoredWeightUses", "_changed_shape", "_last_two", "_indexes_leading", "_grouped"),
        *("_holds", "_swapped"),
    }
)


def is_name(text: str) -> bool:
    """A Python identifier that is not a keyword: what may stand for a module, class or argument in generated code."""
    return text.isidentifier() and not keyword.iskeyword(text)


def target_alias(class_name: str) -> str:
    """The name generated code imports the target class as: its own, unless that would shadow a generated name."""
    return f"{class_name}Target" if class_name in GENERATED_NAMES else class_name


def layer_names(class_name: str, name: str | None) -> tuple[str, str]:
    """(layer class, module name) from the target's class name, or from --name."""
    if name is None:
        layer_class, module_name = f"Lora{class_name}", f"lora_{_snake_case(class_name)}"
        if _shadows(layer_class, class_name):  # a class called Config would give LoraConfig
            layer_class, module_name = f"{layer_class}Layer", f"{module_name}_layer"
    elif not is_name(name):
        raise AnalysisError(f"--name {name!r} must be a Python identifier (no path, not a keyword)")
    else:
        camel = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
        layer_class, module_name = f"Lora{camel}", f"lora_{name.lower()}"
    if _shadows(layer_class, class_name):
        raise AnalysisError(
            f"the layer class would be called {layer_class}, which generated code uses; pick another --name"
        )
    return layer_class, module_name


def _shadows(layer_class: str, class_name: str) -> bool:
    return layer_class in GENERATED_NAMES or layer_class == target_alias(class_name)


def _snake_case(class_name: str) -> str:
    """MyConv -> my_conv, ConvTranspose2d -> conv_transpose2d, Conv1D -> conv1d, GRU -> gru."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z0-9])(?=[A-Z][a-z])", "_", class_name)
    return words.lower().strip("_")


def expression_source(text: str, option: str) -> str:
    """A user's expression (--example-input, --init) as generated code holds it: parsed as one expression, written
    back without comments or line breaks, strings double-quoted as ruff formats them."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise AnalysisError(f"{option} {text!r} is not one Python expression ({exc.msg})") from None
    return ast.unparse(_DoubleQuoted().visit(tree))


def canonical_tree(source: str) -> ast.Expression:
    """An expression's tree whose pieces `ast.unparse` writes back as `expression_source` writes the whole."""
    return _DoubleQuoted().visit(ast.parse(source, mode="eval"))


class _DoubleQuoted(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        # A name node is written back as it is: this one spells the string as JSON does, in double quotes.
        return ast.Name(id=json.dumps(node.value)) if isinstance(node.value, str) else node
