"""The command line's arguments: every command, its options and its help. `cli.py` runs what they parse into."""

from __future__ import annotations

import argparse

from lora_scaffold import __version__, strategies


DESCRIPTION = """\
Generate a PEFT LoRA layer, and a pytest suite for it, for an nn.Module class PEFT cannot adapt yet.

TARGET is 'package.module.Class' or 'path/to/file.py:Class'. Resolving it imports that module, which runs its code.
"""

NEW_EPILOG = f"""\
strategies (how LoRA applies to the weight), in the order auto tries them:
{strategies.help_lines()}
  auto            (default) probes the module numerically and takes the first strategy that fits and is exact

DoRA (use_dora=True) goes through PEFT's own DoRA variants (peft >= 0.16) on linear and (ungrouped) conv
layers whose output the probe finds to be exactly the weight's map plus `bias`, as PEFT's DoRA assumes;
elsewhere the layer raises a ValueError saying why. `new` prints which one you got.

Each run writes a generation record, .lora-scaffold/<module>.json, beside the layer (commit it with the layer)
or at the root of the peft checkout (kept out of git there); `remove` and `check` read it.

examples:
  lora-scaffold new mypkg.MyConv -o out/
  lora-scaffold new torch.nn.Bilinear -o out/ --arg in1_features=5 --arg in2_features=7 --arg out_features=3
  lora-scaffold new my_layers.py:Gate -o out/ --weight proj.weight --example-input 'torch.randn(2, 16)'
  lora-scaffold new torch.nn.ConvTranspose2d --peft-checkout ../peft --dry-run
"""


UPDATE_DESCRIPTION = """\
Render a generated layer again, with the options of its generation record changed by the ones given here, and
merge three ways: what lora-scaffold wrote last time (kept in the record), the files as they are now, and the new
render. Unedited files are replaced; your edits merge in where they do not overlap a change of the render. On an
overlap it stops and lists the hunks, changing nothing, unless --conflicts=markers.

Plugin mode: LAYER is the lora_*.py `new -o` wrote. Patch mode (--peft-checkout): LAYER is the TARGET given to
`new`, in the checkout `new` patched; the dispatch, export and test-battery entries follow the new render too.
"""


VERIFY_DESCRIPTION = """\
Check a LoRA layer class, hand-written, PEFT's own or generated, against PEFT's LoRA contract: dispatch through a
custom module mapping, output unchanged at default init, merge equals the unmerged forward, unmerge restores the
weights, safe_merge catches NaN, disable_adapters, only LoRA parameters train and all get gradients, save/load,
several adapters (switch, delete, two active), rsLoRA scaling, bf16 forward and fp16 merge on CPU, r <= 0 refused,
and, where the layer accepts them, lora_dropout (training only), lora_bias, DoRA and mixed-batch adapter_names.

The checks are the test suite `new` generates, run with pytest in a temporary folder against LAYER on TARGET.
Options the layer rejects with a ValueError are checked to stay rejected (not silently ignored); their own checks
are listed as skipped, with the layer's reason. Prints one line per check; exits 0 only when none fails.
Nothing is written outside the temporary folder.
"""

VERIFY_EPILOG = """\
examples:
  lora-scaffold verify my_layers.py:LoraMyConv --target mypkg.MyConv --arg in_channels=4 --arg out_channels=8
  lora-scaffold verify peft.tuners.lora.layer:Linear --target torch.nn.Linear --arg in_features=8 --arg out_features=6
  lora-scaffold verify out/lora_my_conv.py:LoraMyConv      (a generated layer: the target comes from its record)
"""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of lora-scaffold."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lora-scaffold", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lora-scaffold {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    shared = Parser(add_help=False)  # every command's --json and --debug, declared once
    shared.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    shared.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    new = commands.add_parser(
        "new",
        parents=[shared],
        help="generate a LoRA layer and its tests for TARGET",
        description="Generate a LoraLayer subclass for TARGET and a pytest suite that checks it.",
        epilog=NEW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target_arguments(new, optional_target=True)
    _add_generation_arguments(new)
    new.add_argument("--from-model", metavar="MODEL", help="with --module: target the class of a submodule of MODEL")
    new.add_argument(
        "--module", metavar="NAME", help="the submodule (as `scan` lists it); the tests build it through MODEL"
    )
    _add_model_input(new, "with --from-model: ")
    new.add_argument("-o", "--output", metavar="DIR", help="plugin mode: folder to write into (default: .)")
    new.add_argument(
        "--peft-checkout",
        metavar="PATH",
        help="patch mode: add the layer to this peft source checkout (dispatch_default, exports, tests) instead",
    )
    _add_change_arguments(
        new, "overwrite files that exist with other content; in patch mode, also adapt a type PEFT already supports"
    )
    _add_run_tests(new)

    remove = commands.add_parser(
        "remove",
        parents=[shared],
        help="take a generated layer back out of a peft checkout",
        description=(
            "Undo `new TARGET --peft-checkout PATH`: remove the layer module, its tests, the dispatch_default branch, "
            "the export and the test-battery entries, as the layer's generation record lists them, leaving the files "
            "as they were before. Refuses when what was added has been edited since, unless --force."
        ),
    )
    _add_target_arguments(remove, constructor=False)
    remove.add_argument("--name", help="the --name the layer was generated with, if any")
    remove.add_argument("--peft-checkout", metavar="PATH", required=True, help="the peft source checkout")
    _add_change_arguments(remove, "remove what lora-scaffold added even if it was edited")

    update = commands.add_parser(
        "update",
        parents=[shared],
        help="re-render a generated layer with new options or this lora-scaffold, keeping your edits",
        description=UPDATE_DESCRIPTION,
        epilog=(
            "examples:\n  lora-scaffold update out/lora_my_conv.py --arg out_channels=8\n"
            "  lora-scaffold update mypkg.MyConv --peft-checkout ../peft --dry-run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    update.add_argument("layer", metavar="LAYER", help="the generated lora_*.py, or TARGET with --peft-checkout")
    _add_constructor_arguments(update, ", replacing the recorded one of that NAME")
    _add_generation_arguments(update, strategy_default=None)
    update.add_argument("--peft-checkout", metavar="PATH", help="patch mode: the peft checkout `new` patched")
    update.add_argument(
        "--conflicts",
        choices=("stop", "markers"),
        default="stop",
        help="on overlapping changes: stop and change nothing (default), or write conflict markers",
    )
    update.add_argument("--dry-run", action="store_true", help="show what would change (a diff), write nothing")
    _add_run_tests(update)

    verify = commands.add_parser(
        "verify",
        parents=[shared],
        help="check any LoRA layer class (hand-written too) against PEFT's LoRA contract",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument(
        "layer", metavar="LAYER", help="path/to/file.py:Class, package.module:Class or package.module.Class"
    )
    verify.add_argument(
        "--target", metavar="TARGET", help="the module class LAYER adapts (default: from LAYER's generation record)"
    )
    _add_constructor_arguments(verify)
    verify.add_argument("--weight", metavar="NAME", help="the parameter LAYER adapts, when TARGET has several")
    verify.add_argument("--example-input", metavar="EXPR", help="input the checks run, a Python expression")

    check = commands.add_parser(
        "check",
        parents=[shared],
        help="re-render committed generated examples and report any that differ",
        description=(
            'Re-render every example listed in DIR/manifest.json ({"peft": VERSION, "examples": {folder: {"target": '
            '..., "args": [...], ...}}}) for that peft version and compare it with the files in DIR/folder. Exit 1, '
            "with a diff, when any differ; --update rewrites them instead."
        ),
    )
    check.add_argument("directory", metavar="DIR", nargs="?", default="generated_examples")
    check.add_argument("--update", action="store_true", help="rewrite stale examples")

    scan = commands.add_parser(
        "scan",
        parents=[shared],
        help="list the module classes of a model that hold weights, and how each gets LoRA",
        description=(
            "Build MODEL on the meta device (no weights; for real when it cannot be), list each module class that "
            "holds parameters, what PEFT's LoRA does with it (asked of PEFT), and for the others the `lora-scaffold "
            "new --from-model` command to run; --generate runs them all. MODEL is an "
            "expression (modules import themselves: 'transformers.AutoModel.from_config(transformers.GPT2Config("
            "n_layer=1))') or path/to/file.py:function (called with no arguments)."
        ),
    )
    scan.add_argument("model", metavar="MODEL")
    scan.add_argument(
        "--generate",
        action="store_true",
        help="run every `new` command scan lists, and one for each weight a command leaves, into -o DIR, and write "
        "DIR/__init__.py with one register(config) for all the layers, stacking a class's layers on its modules "
        "(classes that fail are listed with the reason, the others are written)",
    )
    scan.add_argument("-o", "--output", metavar="DIR", help="with --generate: the folder (default: lora_layers)")
    _add_model_input(scan, "for the commands and --generate: ")
    scan.add_argument("--dry-run", action="store_true", help="with --generate: show the files, write nothing")
    scan.add_argument("--force", action="store_true", help="with --generate: overwrite files edited since")

    audit = commands.add_parser(
        "audit",
        parents=[shared],
        help="apply LoRA to every module of MODEL PEFT's or the generated layers adapt, and check each in the model",
        description=(
            "Build MODEL for real, put LoRA on every module PEFT's own layers adapt and, with --layers, every module "
            "the layers generated into DIR adapt (`scan --generate`), give every adapter random non-zero factors, "
            "and report per module: the layer it was dispatched to; live: a change of its adapter moves the model's "
            "output (a fused path that reads the base weight directly makes an adapter dead); its LoRA parameters "
            "get gradients; merging it leaves the model's output as it was. Then the share of weight elements "
            "(parameters of 2 or more dimensions) PEFT adapts alone, and with the generated layers. Exits 1 when a "
            "module fails any of the three."
        ),
    )
    audit.add_argument("model", metavar="MODEL")
    audit.add_argument("--layers", metavar="DIR", help="folder of generated layers (`scan --generate -o DIR`)")
    _add_model_input(audit)

    inspect = commands.add_parser(
        "inspect",
        parents=[shared],
        help="show what lora-scaffold sees in TARGET",
        description="Show TARGET's constructor, parameters, buffers and the attributes PEFT reads.",
    )
    _add_target_arguments(inspect)
    return parser


def _add_run_tests(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-tests",
        action="store_true",
        help="patch mode: then run the generated suite and PEFT's battery on the new cases in the checkout, and put "
        "the results in the pull-request description (.lora-scaffold/<module>.pr.md)",
    )


def _add_model_input(parser: argparse.ArgumentParser, use: str = "") -> None:
    parser.add_argument(
        "--model-input",
        metavar="EXPR",
        help=f"{use}what MODEL is fed: a dict of keyword inputs, a tuple or a tensor (default: made from its "
        "transformers config, e.g. token ids; a model without one needs it)",
    )


def _add_change_arguments(parser: argparse.ArgumentParser, force_help: str) -> None:
    """The options of the commands that change files."""
    parser.add_argument("--dry-run", action="store_true", help="show what would change (a diff), write nothing")
    parser.add_argument("--force", action="store_true", help=force_help)


def _add_generation_arguments(parser: argparse.ArgumentParser, strategy_default: str | None = strategies.AUTO) -> None:
    parser.add_argument("--weight", metavar="NAME", help="parameter to adapt, e.g. weight or conv.weight")
    parser.add_argument(
        "--strategy",
        choices=strategies.CHOICES,
        default=strategy_default,
        help=f"how LoRA applies (default: {strategy_default or 'the recorded one'})",
    )
    parser.add_argument(
        "--example-input", metavar="EXPR", help="input for the probe and the tests, a Python expression"
    )
    parser.add_argument("--name", help="base name of the output: lora_NAME.py, LoraName (default: from the class)")


def _add_constructor_arguments(parser: argparse.ArgumentParser, arg_note: str = "") -> None:
    parser.add_argument(
        "--arg",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help=f"constructor argument of the target as a Python literal{arg_note}; repeatable",
    )
    parser.add_argument(
        "--init",
        metavar="EXPR",
        help="build the target from this expression instead, e.g. for classes that take a config: "
        "'LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32))' (the target's module, torch and nn in "
        "scope); the generated tests build it the same way",
    )


def _add_target_arguments(parser: argparse.ArgumentParser, constructor: bool = True, optional_target=False) -> None:
    parser.add_argument(
        "target",
        metavar="TARGET",
        nargs="?" if optional_target else None,
        help="package.module.Class or path/to/file.py:Class",
    )
    if constructor:
        _add_constructor_arguments(parser)
