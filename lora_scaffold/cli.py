"""The command line: parse, call the workflow, print. The only module that prints or exits."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_scaffold import audit, checkout_commands, generate, views, workflow
from lora_scaffold.arguments import build_parser
from lora_scaffold.errors import ScaffoldError, StaleOutputError
from lora_scaffold.request import Request


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a usage error already printed
        return exit.code
    try:
        with _import_noise_hidden():
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


# PEFT imports transformers, which imports torchao where it is installed: torchao logs a line for each CUDA kernel it
# cannot load (on every CPU machine), and torch one for each enum torchao registers; PEFT imports bitsandbytes, which
# on a CPU with AVX512-BF16 logs that it could not fetch a 4-bit kernel from the Hub. Said on import, of nothing this
# tool does, before a command's output; their errors still show.
IMPORT_NOISE = ("torchao", "torch.utils._pytree", "bitsandbytes")


@contextlib.contextmanager
def _import_noise_hidden():
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
        outcome = checkout_commands.patch_checkout(_request(args), args.peft_checkout, args.force, args.dry_run)
    else:
        outcome = workflow.new_plugin(_request(args), Path(args.output or "."), args.force, dry_run=args.dry_run)
    return _finish_change(args, "new", outcome)


def _run_checkout_tests(args: argparse.Namespace, outcome: workflow.Outcome) -> tuple:
    """--run-tests: the new tests run in the checkout, and the description gets their results."""
    if not args.run_tests:
        return ()
    if args.peft_checkout is None or args.dry_run:
        raise ScaffoldError("--run-tests runs the tests in the patched checkout: give --peft-checkout, not --dry-run")
    _progress(args, "running the generated suite and PEFT's battery on the new cases ...")
    return checkout_commands.test_checkout(outcome)


def run_remove(args: argparse.Namespace) -> int:
    outcome = checkout_commands.remove_from_checkout(
        args.target, args.name, args.peft_checkout, args.force, args.dry_run
    )
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
        outcome = checkout_commands.update_checkout(
            args.layer, args.name, args.peft_checkout, change, args.conflicts, args.dry_run
        )
    else:
        outcome = workflow.update_plugin(Path(args.layer), {**change, "name": args.name}, args.conflicts, args.dry_run)
    return _finish_change(args, "update", outcome)


def _finish_change(args: argparse.Namespace, command: str, outcome: workflow.Outcome) -> int:
    """`new` and `update`: apply the change (unless --dry-run), run the checkout's tests when asked, show both."""
    _apply_unless_dry(outcome, args.dry_run)
    results = _run_checkout_tests(args, outcome)
    style = views.Style.for_stream(sys.stdout)
    text = f"{views.plan_text(outcome.report)}\n{views.changes_text(outcome, args.dry_run, style)}"
    text += "".join(f"\n{views.suite_result_text(result)}" for result in results)
    _show(args, lambda: text, lambda: views.outcome_json(command, outcome, args.dry_run, results))
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
