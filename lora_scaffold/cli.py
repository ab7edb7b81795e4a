"""The command line: parse, call the workflow, print. The only module that prints or exits."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_scaffold import __version__, audit, generate, strategies, views, workflow
from lora_scaffold.errors import ScaffoldError, StaleOutputError
from lora_scaffold.request import Request


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

    new = commands.add_parser(
        "new",
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
        help="re-render a generated layer with new options or this lora-scaffold, keeping your edits",
        description=UPDATE_DESCRIPTION,
        epilog=(
            "examples:\n  lora-scaffold update out/lora_my_conv.py --arg out_channels=8\n"
            "  lora-scaffold update mypkg.MyConv --peft-checkout ../peft --dry-run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    update.add_argument("layer", metavar="LAYER", help="the generated lora_*.py, or TARGET with --peft-checkout")
    update.add_argument(
        "--arg",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="constructor argument as a Python literal, replacing the recorded one of that NAME; repeatable",
    )
    update.add_argument("--init", metavar="EXPR", help="build the target from this expression instead (as for new)")
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
    update.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    update.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    verify = commands.add_parser(
        "verify",
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
    verify.add_argument(
        "--arg", metavar="NAME=VALUE", action="append", default=[], help="constructor argument of TARGET; repeatable"
    )
    verify.add_argument("--init", metavar="EXPR", help="build TARGET from this expression instead (as for new)")
    verify.add_argument("--weight", metavar="NAME", help="the parameter LAYER adapts, when TARGET has several")
    verify.add_argument("--example-input", metavar="EXPR", help="input the checks run, a Python expression")
    verify.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    verify.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    check = commands.add_parser(
        "check",
        help="re-render committed generated examples and report any that differ",
        description=(
            'Re-render every example listed in DIR/manifest.json ({"peft": VERSION, "examples": {folder: {"target": '
            '..., "args": [...], ...}}}) for that peft version and compare it with the files in DIR/folder. Exit 1, '
            "with a diff, when any differ; --update rewrites them instead."
        ),
    )
    check.add_argument("directory", metavar="DIR", nargs="?", default="generated_examples")
    check.add_argument("--update", action="store_true", help="rewrite stale examples")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    scan = commands.add_parser(
        "scan",
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
        help="run every `new` command scan lists, into -o DIR, and write DIR/__init__.py with one register(config) "
        "for all the layers (classes that fail are listed with the reason, the others are written)",
    )
    scan.add_argument("-o", "--output", metavar="DIR", help="with --generate: the folder (default: lora_layers)")
    _add_model_input(scan, "for the commands and --generate: ")
    scan.add_argument("--dry-run", action="store_true", help="with --generate: show the files, write nothing")
    scan.add_argument("--force", action="store_true", help="with --generate: overwrite files edited since")
    scan.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    scan.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    audit = commands.add_parser(
        "audit",
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
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    audit.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    inspect = commands.add_parser(
        "inspect",
        help="show what lora-scaffold sees in TARGET",
        description="Show TARGET's constructor, parameters, buffers and the attributes PEFT reads.",
    )
    _add_target_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
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
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


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


def _add_target_arguments(parser: argparse.ArgumentParser, constructor: bool = True, optional_target=False) -> None:
    parser.add_argument(
        "target",
        metavar="TARGET",
        nargs="?" if optional_target else None,
        help="package.module.Class or path/to/file.py:Class",
    )
    if constructor:
        parser.add_argument(
            "--arg",
            metavar="NAME=VALUE",
            action="append",
            default=[],
            help="constructor argument as a Python literal; repeatable",
        )
        parser.add_argument(
            "--init",
            metavar="EXPR",
            help="build the target from this expression instead, e.g. for classes that take a config: "
            "'LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32))' (the target's module, torch and nn in "
            "scope); the generated tests build it the same way",
        )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a usage error already printed
        return exit.code
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except ScaffoldError as error:
        if args.debug:
            raise
        if args.json:
            print(json.dumps({"command": args.command, "error": str(error)}))
        else:
            print(f"lora-scaffold: error: {error}", file=sys.stderr)
        return error.exit_code


def _request(args: argparse.Namespace) -> Request:
    options = {
        "weight": args.weight,
        "strategy": args.strategy,
        "example_input": args.example_input,
        "name": args.name,
    }
    if args.from_model or args.module:
        if not (args.from_model and args.module) or args.target or args.init or args.arg:
            raise ScaffoldError("--from-model MODEL --module NAME stands for TARGET, --arg and --init: give it alone")
        return workflow.request_from_model(args.from_model, args.module, args.model_input, **options)
    if args.model_input:
        raise ScaffoldError("--model-input is what --from-model's model is fed: give --from-model MODEL --module NAME")
    if not args.target:
        raise ScaffoldError("give TARGET, or --from-model MODEL --module NAME")
    return Request(args.target, tuple(args.arg), init=args.init, **options)


def run_inspect(args: argparse.Namespace) -> int:
    spec = workflow.inspect_target(Request(args.target, tuple(args.arg), init=args.init))
    _show(args, lambda: views.spec_text(spec), lambda: views.spec_json(spec))
    return 0


def run_scan(args: argparse.Namespace) -> int:
    if not args.generate:
        if args.output or args.dry_run or args.force:
            raise ScaffoldError("-o, --dry-run and --force go with --generate")
        _progress(args, f"building {args.model} on the meta device ...")
        found = workflow.scan_model(args.model, args.model_input)
        _show(args, lambda: views.scan_text(found), lambda: views.scan_json(found))
        return 0
    _progress(args, f"generating a layer for every class of {args.model} PEFT cannot adapt ...")
    outcome, results, classes = generate.generate(
        args.model, Path(args.output or "lora_layers"), args.model_input, args.force, args.dry_run
    )
    _apply_unless_dry(outcome, args.dry_run)
    style = views.Style.for_stream(sys.stdout)
    text = f"{views.generated_text(results)}\n{views.changes_text(outcome, args.dry_run, style)}"
    _show(args, lambda: text, lambda: views.generated_json(results, classes, outcome, args.dry_run))
    return 0


def run_audit(args: argparse.Namespace) -> int:
    _progress(args, f"building {args.model} and checking every adapter in it ...")
    audit.model_expression(args.model)  # a model from a file: the file's folder on sys.path, for the layers' imports
    layers = audit.load_layers(Path(args.layers)) if args.layers else ()
    result = audit.audit(args.model, layers, args.model_input)
    _show(args, lambda: views.audit_text(result), lambda: views.audit_json(result))
    return 0 if result.passed else 1


def run_new(args: argparse.Namespace) -> int:
    _progress(args, f"building {args.target} and probing how LoRA applies to it ...")
    if args.peft_checkout is not None:
        if args.output is not None:
            raise ScaffoldError("-o writes plugin files and --peft-checkout patches peft: give one of them, not both")
        outcome = workflow.patch_checkout(_request(args), args.peft_checkout, args.force, args.dry_run)
    else:
        outcome = workflow.new_plugin(_request(args), Path(args.output or "."), args.force, dry_run=args.dry_run)
    _apply_unless_dry(outcome, args.dry_run)
    results = _run_checkout_tests(args, outcome)
    style = views.Style.for_stream(sys.stdout)
    text = f"{views.plan_text(outcome.report)}\n{views.changes_text(outcome, args.dry_run, style)}"
    text += "".join(f"\n{views.suite_result_text(result)}" for result in results)
    _show(args, lambda: text, lambda: views.outcome_json("new", outcome, args.dry_run, results))
    return 0


def _run_checkout_tests(args: argparse.Namespace, outcome: workflow.Outcome) -> tuple:
    """--run-tests: the new tests run in the checkout, and the description gets their results."""
    if not args.run_tests:
        return ()
    if args.peft_checkout is None or args.dry_run:
        raise ScaffoldError("--run-tests runs the tests in the patched checkout: give --peft-checkout, not --dry-run")
    _progress(args, "running the generated suite and PEFT's battery on the new cases ...")
    return workflow.test_checkout(outcome)


def run_remove(args: argparse.Namespace) -> int:
    outcome = workflow.remove_from_checkout(args.target, args.name, args.peft_checkout, args.force, args.dry_run)
    _apply_unless_dry(outcome, args.dry_run)
    style = views.Style.for_stream(sys.stdout)
    _show(
        args,
        lambda: views.changes_text(outcome, args.dry_run, style),
        lambda: views.outcome_json("remove", outcome, args.dry_run),
    )
    return 0


def run_update(args: argparse.Namespace) -> int:
    _progress(args, f"rendering {args.layer} again and merging your edits ...")
    change = {
        "args": tuple(args.arg),
        "weight": args.weight,
        "strategy": args.strategy,
        "example_input": args.example_input,
        "init": args.init,
    }
    if args.peft_checkout is not None:
        outcome = workflow.update_checkout(
            args.layer, args.name, args.peft_checkout, change, args.conflicts, args.dry_run
        )
    else:
        outcome = workflow.update_plugin(Path(args.layer), {**change, "name": args.name}, args.conflicts, args.dry_run)
    _apply_unless_dry(outcome, args.dry_run)
    results = _run_checkout_tests(args, outcome)
    style = views.Style.for_stream(sys.stdout)
    text = f"{views.plan_text(outcome.report)}\n{views.changes_text(outcome, args.dry_run, style)}"
    text += "".join(f"\n{views.suite_result_text(result)}" for result in results)
    _show(args, lambda: text, lambda: views.outcome_json("update", outcome, args.dry_run, results))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    request = None
    if args.target:
        request = Request(args.target, tuple(args.arg), args.weight, example_input=args.example_input, init=args.init)
    elif args.arg or args.init or args.weight or args.example_input:
        raise ScaffoldError("--arg, --init, --weight and --example-input describe --target: give --target too")
    _progress(args, f"running PEFT's LoRA contract checks on {args.layer} ...")
    (verification,) = workflow.verify_layers([(args.layer, request)])
    style = views.Style.for_stream(sys.stdout)
    _show(args, lambda: views.verification_text(verification, style), lambda: views.verification_json(verification))
    return 0 if verification.passed else 1


def run_check(args: argparse.Namespace) -> int:
    root = Path(args.directory)
    _progress(args, f"re-rendering the examples of {root / 'manifest.json'} ...")
    stale, outcomes = workflow.check_examples(root, dry_run=not args.update)
    if args.update:
        for outcome in outcomes:
            outcome.apply()
    error = None
    if stale and not args.update:
        error = StaleOutputError(
            f"generated examples {', '.join(stale)} differ from a fresh render; refresh: lora-scaffold check {root} --update"
        )
    if args.json:
        print(json.dumps({**views.check_json(stale, outcomes, args.update), "error": str(error) if error else None}))
        return error.exit_code if error else 0
    for note in (note for outcome in outcomes for note in outcome.report.notes):
        print(f"note: {note}")
    for change in (change for outcome in outcomes for change in outcome.changes if change.writes):
        print(change.diff(), end="")
    if error:
        raise error
    if args.update:
        print(f"updated {len(stale)} of the examples in {root}" + (f": {', '.join(stale)}" if stale else ""))
    else:
        print(f"all examples in {root} are up to date")
    return 0


def _apply_unless_dry(outcome: workflow.Outcome, dry_run: bool) -> None:
    if not dry_run and not outcome.report.nothing_to_do:
        outcome.apply()


def _show(args: argparse.Namespace, text, data) -> None:
    print(json.dumps(data(), indent=2) if getattr(args, "json", False) else text())


def _progress(args: argparse.Namespace, message: str) -> None:
    """Long steps say what they do, on a terminal only (pipes and --json get the result alone)."""
    if sys.stderr.isatty() and not getattr(args, "json", False):
        print(message, file=sys.stderr)


COMMANDS = {
    "scan": run_scan,
    "audit": run_audit,
    "new": run_new,
    "update": run_update,
    "verify": run_verify,
    "remove": run_remove,
    "inspect": run_inspect,
    "check": run_check,
}
