from lora_scaffold.import_blocks import format_imports


def test_sections_follow_isort_with_peft_first_party():
    block = format_imports(
        [
            ("torch", ("nn",)),
            ("peft", ("LoraConfig",)),
            ("math", ()),
            ("__future__", ("annotations",)),
            ("torch", ()),
            ("zlib_layers", ("Zed",)),
            ("torch.nn.functional as F", ()),
            ("typing", ("Optional", "Any")),
        ]
    )
    assert block == (
        "from __future__ import annotations\n\n"
        "import math\nfrom typing import Any, Optional\n\n"
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\nfrom zlib_layers import Zed\n\n"
        "from peft import LoraConfig"
    )


def test_names_from_one_module_merge_and_sort_constants_classes_functions():
    block = format_imports([("torch", ("nn",)), ("torch", ("Tensor", "SEED"))])
    assert block == "from torch import SEED, Tensor, nn"


def test_generated_neighbours_count_as_first_party():
    block = format_imports([("lora_x", ("LoraX",)), ("torch", ())], first_party=("peft", "lora_x"))
    assert block == "import torch\n\nfrom lora_x import LoraX"
