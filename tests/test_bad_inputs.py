"""Bad input, as a linter's corpus: each case exits 2 with one line on stderr, no traceback, and leaves the
output folder or the checkout byte for byte (modes included) as it was."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import snapshot

from lora_scaffold.cli import main


BAD = Path(__file__).resolve().parent / "bad_targets"

PLUGIN_CASES = [
    # the target
    (["nosuchpkg_xyz.Layer"], "no module named 'nosuchpkg_xyz'"),
    (["torch.nn.NoSuchLayer"], "has no attribute 'NoSuchLayer'"),
    (["scaffold_targets.NotAModule"], "not an nn.Module subclass"),
    (["scaffold_targets.NOT_A_MODULE"], "not an nn.Module subclass"),
    ([""], "give TARGET, or --from-model MODEL --module NAME"),
    (["torch"], "should look like 'package.module.Class'"),
    (["torch..Linear"], "should look like 'package.module.Class'"),
    (["torch.nn.Linear."], "should look like 'package.module.Class'"),
    (["class.Foo"], "should look like 'package.module.Class'"),
    (["missing.py:Gate"], "no such file"),
    (["layers.txt:Gate"], "should look like 'path/to/file.py:Class'"),
    ([f"{BAD}/copy.py:Gate"], "would shadow the module 'copy'"),
    ([f"{BAD}/exits_on_import.py:Gate"], "failed: SystemExit"),
    ([f"{BAD}/fails_on_import.py:Gate"], "ZeroDivisionError"),
    ([f"{BAD}/copy.py:class"], "should look like 'path/to/file.py:Class'"),
    # the constructor
    (["scaffold_targets.RaisingCtor"], "RaisingCtor() raised RuntimeError: size must be even"),
    (["scaffold_targets.RequiredArgs"], "needs constructor arguments width, depth"),
    (["torch.nn.Linear", "--arg", "in_features=eight"], "bad --arg value for in_features"),
    (["torch.nn.Linear", "--arg", "in_features"], "expected NAME=VALUE"),
    (["torch.nn.Linear", "--arg", "class=1"], "NAME a Python identifier"),
    (["torch.nn.Linear", "--arg", "1x=2"], "NAME a Python identifier"),
    (["torch.nn.Linear", "--arg", "in_features=1e999"], "no literal form"),
    (["torch.nn.Linear", "--arg", "in_features=..."], "no literal form"),
    (["torch.nn.Linear", "--arg", "in_features=[[[["], "not a Python literal"),
    (["torch.nn.Linear", "--arg", "colour=1"], "takes no argument named colour"),
    (["torch.nn.Linear", "--arg", "in_features=-3"], "raised RuntimeError"),
    (["torch.nn.Linear", "--arg", "in_features='a'"], "raised TypeError"),
    (["torch.nn.Linear", "--init", "Linear(4, 5"], "is not one Python expression"),
    (["torch.nn.Linear", "--init", "Nonexistent(4, 5)"], "--init uses 'Nonexistent'"),
    (["torch.nn.Linear", "--init", "nn.Conv1d(4, 5, 3)"], "gives a Conv1d, not a Linear"),
    (["torch.nn.Linear", "--init", "Linear(4, -5)"], "raised RuntimeError"),
    (["torch.nn.Linear", "--init", "Linear(4, 5)", "--arg", "bias=False"], "not with --arg"),
    # the weight
    (["scaffold_targets.NoParameters"], "no parameters: there is no trainable weight"),
    (["scaffold_targets.OnlyBuffers"], "only buffers: there is no trainable weight"),
    (["torch.nn.Linear", "--weight", "kernel"], "has no parameter 'kernel'"),
    (["torch.nn.Linear", "--weight", ""], "has no parameter ''"),
    (["scaffold_targets.TwoWeights"], "several weights"),
    (["torch.nn.LayerNorm", "--arg", "normalized_shape=4"], "no weight with 2 or more dimensions"),
    (["scaffold_targets.ScalarWeight", "--weight", "weight"], "has shape []: no low-rank adapter fits it"),
    (["scaffold_targets.ScalarWeight"], "no weight with 2 or more dimensions"),
    (["scaffold_targets.IgnoresWeight"], "does not change with 'weight'"),
    (["torch.nn.LazyLinear"], "has lazy parameters (weight, bias)"),
    (["scaffold_targets.OrthogonalLinear"], "cannot take a merged weight back (off by"),
    (["scaffold_targets.WeightNormLinear", "--strategy", "linear"], "--strategy linear cannot merge into weight"),
    # the strategy
    (["torch.nn.Linear", "--strategy", "nope"], "invalid choice: 'nope'"),
    (["torch.nn.Linear", "--strategy", "conv"], "--strategy conv does not fit"),
    (["torch.nn.Linear", "--strategy", "embedding"], "--strategy embedding does not fit"),
    (["torch.nn.Linear", "--strategy", "reuse"], "reuse: needs a subclass of nn.Linear"),
    (["scaffold_targets.OffsetLinear", "--strategy", "reuse"], "reuse: needs the parent's forward"),
    (["scaffold_targets.SquaredConv", "--strategy", "linear"], "--strategy linear does not fit"),
    (["scaffold_targets.NoisyLinear"], "cannot be checked: its forward gives different outputs"),
    # names
    (["torch.nn.Linear", "--name", "not-valid"], "must be a Python identifier"),
    (["torch.nn.Linear", "--name", "import"], "must be a Python identifier"),
    (["torch.nn.Linear", "--name", "../escape"], "must be a Python identifier"),
    (["torch.nn.Linear", "--name", ""], "must be a Python identifier"),
    (["torch.nn.Linear", "--name", "config"], "LoraConfig, which generated code uses"),
    (["torch.nn.Linear", "--name", "layer"], "LoraLayer, which generated code uses"),
    # the input
    (["torch.nn.Conv2d", "--example-input", "torch.randn("], "is not one Python expression"),
    (
        ["torch.nn.Conv2d", "--example-input", "torch.randn(2, 3)"],
        "Conv2d fails on --example-input torch.randn(2, 3): RuntimeError",
    ),
    (
        ["torch.nn.Linear", "--example-input", "torch.randn(2, 5)"],  # Linear(8, ...): the given input is named
        "Linear fails on --example-input torch.randn(2, 5): RuntimeError: mat1 and mat2 shapes cannot be multiplied",
    ),
    (["torch.nn.Linear", "--example-input", "1/0"], "ZeroDivisionError"),
    (["torch.nn.Linear", "--example-input", "torch.randn(2, 8)\nimport os"], "is not one Python expression"),
    (["torch.nn.Linear", "--example-input", "'text'"], "Linear fails on --example-input"),
    (
        ["torch.nn.Linear", "--example-input", "(torch.randn(2, 8), 'x')"],
        'Linear fails on --example-input (torch.randn(2, 8), "x"): TypeError',
    ),
    (["torch.nn.Linear", "--example-input", "__import__('sys').exit(0)"], "SystemExit"),
    (["scaffold_targets.ExitingForward"], "could not infer an input"),
    (["scaffold_targets.ScalarOutput"], "could not infer an input"),
    # the command line
    (["torch.nn.Linear", "--peft-checkout", "x"], "give one of them, not both"),
    (["torch.nn.Linear", "--bogus"], "unrecognized arguments: --bogus"),
]

# Cases that need something in the output folder first: (name, arguments, message).
PREPARED_CASES = [
    ("conflict", ["torch.nn.Linear"], "already exists with other content; pass --force"),
    ("not_utf8", ["torch.nn.Linear"], "is not UTF-8 text"),
    ("symlink", ["torch.nn.Linear"], "is not a regular file"),
    ("bad_record", ["torch.nn.Linear"], "is not a lora-scaffold generation record"),
    ("record_format", ["torch.nn.Linear"], "record format 99"),
    ("output_is_a_file", ["torch.nn.Linear"], "exists and is not a folder"),
    ("output_below_a_file", ["torch.nn.Linear"], "(Not a directory); nothing was changed"),
    ("read_only_output", ["torch.nn.Linear"], "; nothing was changed"),
]


def prepare(case: str, folder: Path) -> Path:
    """The output folder of `case`, with what the case needs in it; returns the -o argument."""
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    (folder / "notes.txt").chmod(0o640)
    if case == "conflict":
        (folder / "lora_linear.py").write_text("# my own layer\n")
    elif case == "not_utf8":
        (folder / "lora_linear.py").write_bytes(b"\xff\xfe not utf-8")
    elif case == "symlink":
        (folder / "lora_linear.py").symlink_to(folder / "notes.txt")
    elif case in ("bad_record", "record_format"):
        (folder / ".lora-scaffold").mkdir()
        text = "{not json" if case == "bad_record" else json.dumps({"format": 99})
        (folder / ".lora-scaffold" / "lora_linear.json").write_text(text)
    elif case == "output_is_a_file":
        return folder / "notes.txt"
    elif case == "output_below_a_file":
        return folder / "notes.txt" / "sub"
    elif case == "read_only_output":
        read_only(folder)
    return folder


def read_only(folder: Path) -> None:
    """A folder nothing can be created in, even by root (who ignores modes): immutable where chattr works, else
    mode 0o555 (enough for other users)."""
    folder.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not available: no folder is read-only to root")


def assert_one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("lora-scaffold") and ": error: " in err and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err


@pytest.mark.parametrize("arguments, message", PLUGIN_CASES, ids=[" ".join(a)[:60] for a, _ in PLUGIN_CASES])
def test_bad_plugin_input(arguments, message, tmp_path, capsys):
    out = prepare("plain", tmp_path / "out")
    before = snapshot(tmp_path)
    assert main(["new", *arguments, "-o", str(out)]) == 2
    assert_one_line_error(capsys, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case, arguments, message", PREPARED_CASES, ids=[c for c, _, _ in PREPARED_CASES])
def test_bad_output_folder(case, arguments, message, tmp_path, capsys):
    out = prepare(case, tmp_path / "out")
    try:
        before = snapshot(tmp_path)
        assert main(["new", *arguments, "-o", str(out)]) == 2
        assert_one_line_error(capsys, message)
        assert snapshot(tmp_path) == before
    finally:
        if case == "read_only_output":  # writable again, so that pytest can remove it
            subprocess.run(["chattr", "-i", str(out)], capture_output=True)
            out.chmod(0o755)


MANIFEST_CASES = [
    (None, "cannot read"),
    ("{not json", "cannot read"),
    ('{"conv": ["torch.nn.Conv2d"]}', 'should be {"peft": "VERSION"'),
    ('{"peft": "0.21.2", "examples": {"../escaped": {"target": "torch.nn.Linear"}}}', "must be a plain folder name"),
    ('{"peft": "0.21.2", "examples": {"a": {"target": "torch.nn.Linear", "colour": 1}}}', "example 'a': unknown"),
    ('{"peft": "0.21.2", "examples": {"a": {"target": "torch.nn.Linear", "args": "x"}}}', "example 'a': `args`"),
    ('{"peft": "0.21.2", "examples": {"a": {"target": 3}}}', "example 'a': `target` must be a string"),
    ('{"peft": "0.11", "examples": {}}', "peft 0.11 is too old"),
    ('{"peft": "0.21.2", "examples": {"a": {"target": "nosuchpkg_xyz.L"}}}', "no module named 'nosuchpkg_xyz'"),
]


@pytest.mark.parametrize("manifest, message", MANIFEST_CASES)
@pytest.mark.parametrize("update", [False, True])
def test_bad_manifest(manifest, message, update, tmp_path, capsys):
    root = tmp_path / "examples"
    root.mkdir()
    if manifest is not None:
        (root / "manifest.json").write_text(manifest)
    before = snapshot(tmp_path)
    assert main(["check", str(root), *(["--update"] if update else [])]) == 2
    assert_one_line_error(capsys, message)
    assert snapshot(tmp_path) == before


def test_inspect_and_remove_refuse_bad_input_alike(tmp_path, capsys):
    assert main(["inspect", "torch.nn.Linear", "--arg", "in_features=1e999"]) == 2
    assert_one_line_error(capsys, "no literal form")
    assert main(["remove", "torch.nn.Linear", "--peft-checkout", ""]) == 2
    assert_one_line_error(capsys, "--peft-checkout needs the path")
    assert main(["remove", "torch.nn.Linear", "--peft-checkout", str(tmp_path / "nowhere")]) == 2
    assert_one_line_error(capsys, "no such folder")


@pytest.fixture(scope="module")
def shared_checkout(pristine, tmp_path_factory) -> Path:
    """One checkout for every patch-mode case: none of them may change it."""
    root = tmp_path_factory.mktemp("bad_patch") / "peft"
    shutil.copytree(pristine, root)
    return root


PATCH_CASES = [
    (["new", "torch.nn.Linear"], "PEFT already supports torch.nn.Linear"),
    (["new", "torch.nn.ConvTranspose2d", "--name", "variants", "--force"], "tests/test_lora_variants.py exists"),
    (["new", "torch.nn.ConvTranspose2d", "--name", "model"], "PEFT already exports a LoraModel"),
    (["new", "torch.nn.ConvTranspose2d", "--name", "config", "--force"], "LoraConfig, which generated code uses"),
    (["new", "scaffold_targets.TwoWeights"], "several weights"),
    (["new", "torch.nn.ConvTranspose2d", "--init", "ConvTranspose2d(4, 6, 3)", "--arg", "stride=2"], "not with --arg"),
    (["new", "torch.nn.ConvTranspose2d", "--dry-run", "--arg", "x=1"], "takes no argument named x"),
    (["remove", "torch.nn.ConvTranspose2d", "--name", "config"], "LoraConfig, which generated code uses"),
]


@pytest.mark.parametrize("arguments, message", PATCH_CASES, ids=[" ".join(a) for a, _ in PATCH_CASES])
def test_bad_patch_input_leaves_the_checkout_alone(arguments, message, shared_checkout, capsys):
    before = snapshot(shared_checkout)
    assert main([*arguments, "--peft-checkout", str(shared_checkout)]) == 2
    assert_one_line_error(capsys, message)
    assert snapshot(shared_checkout) == before


def minimal_checkout(root: Path, **replace: str) -> Path:
    """The four files patch mode reads, small; `replace` swaps one (key: layer, init, version, battery)."""
    texts = {
        "layer": "import torch\n\n\ndef dispatch_default(target, adapter_name, config, **kwargs):\n"
        "    target_base_layer = target\n    if isinstance(target_base_layer, torch.nn.Linear):\n"
        "        new_module = None\n    return None\n",
        "init": 'from .config import LoraConfig\nfrom .layer import LoraLayer\n\n__all__ = ["LoraConfig", "LoraLayer"]\n',
        "version": '__version__ = "0.21.2"\n',
        "battery": "TEST_CASES = [\n    (1,),\n    (2,),\n]\n\n\nclass MockTransformerWrapper:\n"
        "    @classmethod\n    def from_pretrained(cls, model_id, dtype=None):\n"
        "        if model_id == 1:\n            return None\n\n        raise ValueError(model_id)\n",
    } | replace
    paths = {
        "layer": "src/peft/tuners/lora/layer.py",
        "init": "src/peft/tuners/lora/__init__.py",
        "version": "src/peft/__init__.py",
        "battery": "tests/test_custom_models.py",
    }
    for key, relative in paths.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        text = texts[key]
        (root / relative).write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


NO_PLAIN_IMPORTS = (
    "from torch import nn\n\n\ndef dispatch_default(target):\n    target_base_layer = target\n"
    "    if isinstance(target_base_layer, nn.Linear):\n        return None\n"
)
CHECKOUT_CASES = [
    ({"layer": b"\xff\xfe"}, "is not UTF-8 text"),
    ({"layer": "def other():\n    pass\n"}, "no module-level function dispatch_default"),
    ({"layer": "def dispatch_default(target):\n    return None\n"}, "no if/elif chain on target_base_layer"),
    ({"layer": "def dispatch_default(\n"}, "does not parse"),
    ({"layer": NO_PLAIN_IMPORTS}, "no plain `import x` lines"),
    ({"init": "from .config import LoraConfig\n"}, "no `__all__ = [...]` list"),
    ({"init": '__all__ = ["A", "B"]\n'}, "no `from .module import ...` lines"),
    ({"version": "VERSION = 1\n"}, "sets no __version__"),
    ({"version": '__version__ = "0.12.0"\n'}, "peft 0.12.0 is too old"),
    ({"battery": "TEST_CASES = []\n"}, "has no class MockTransformerWrapper"),
    ({"battery": "class MockTransformerWrapper:\n    pass\n"}, "has no from_pretrained"),
    (
        {"battery": "class MockTransformerWrapper:\n    def from_pretrained(cls):\n        return 1\n"},
        "does not end in",
    ),
]


@pytest.mark.parametrize("replace, message", CHECKOUT_CASES, ids=[m for _, m in CHECKOUT_CASES])
def test_a_checkout_that_does_not_look_as_expected(replace, message, tmp_path, capsys):
    root = minimal_checkout(tmp_path / "peft", **replace)
    before = snapshot(tmp_path)
    assert main(["new", "scaffold_targets.PlainLinear", "--peft-checkout", str(root)]) == 2
    assert_one_line_error(capsys, message)
    assert snapshot(tmp_path) == before


def test_remove_with_a_broken_record_names_it(tmp_path, capsys):
    root = minimal_checkout(tmp_path / "peft")
    (root / ".lora-scaffold").mkdir()
    (root / ".lora-scaffold" / "lora_plain_linear.json").write_text("{broken")
    before = snapshot(tmp_path)
    assert main(["remove", "scaffold_targets.PlainLinear", "--peft-checkout", str(root)]) == 2
    assert_one_line_error(capsys, "lora_plain_linear.json is not a lora-scaffold generation record")
    assert main(["new", "torch.nn.Linear", "--peft-checkout", "  "]) == 2
    assert_one_line_error(capsys, "--peft-checkout needs the path")
    assert snapshot(tmp_path) == before


def test_the_corpus_is_large():
    total = len(PLUGIN_CASES) + len(PREPARED_CASES) + len(MANIFEST_CASES) + len(PATCH_CASES) + len(CHECKOUT_CASES)
    assert total >= 60


PACKAGE_NAMES = [
    ("my-layers", "is not a name Python imports (`from my-layers import register`); name the folder like 'my_layers'"),
    ("3d", "name the folder like 'layers_3d'"),
    ("class", "name the folder like 'class_layers'"),
    ("peft", "a package named 'peft' would hide the installed module 'peft'"),
    ("test", "a package named 'test' would hide the installed module 'test'"),
]


@pytest.mark.parametrize("name, message", PACKAGE_NAMES, ids=[name for name, _ in PACKAGE_NAMES])
def test_generate_refuses_a_folder_no_package_can_be_named_after(name, message, tmp_path, capsys):
    """`scan --generate -o DIR` writes a package (`from DIR import register`), whose suites import through it."""
    model = f"{Path(__file__).parent / 'scan_models.py'}:small_model"
    before = snapshot(tmp_path)
    assert main(["scan", model, "--generate", "-o", str(tmp_path / name)]) == 2
    assert_one_line_error(capsys, message)
    assert snapshot(tmp_path) == before
