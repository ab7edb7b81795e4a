"""The command line: parse, run the pipeline, print. The only module that prints or exits."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lora_scaffold import __version__
from lora_scaffold.analyse import STRATEGIES, LayerPlan, Options, analyse, layer_names
from lora_scaffold.errors import ScaffoldError, StaleOutputError
from lora_scaffold.files import FileChange, apply_changes, plan_changes, plan_deletions, refuse_conflicts
from lora_scaffold.introspect import TargetSpec, introspect, parse_arg_overrides
from lora_scaffold.patch.battery import BATTERY_FILE
from lora_scaffold.patch.checkout import LORA_PACKAGE, PeftCheckout, read_checkout, safe_path
from lora_scaffold.patch.cst_utils import PatchError
from lora_scaffold.patch.plan import (
    EDITED_FILES,
    build_patch,
    checkout_path,
    edited_by_user,
    patched_sources,
    refuse_foreign_layer,
    unpatched_sources,
)
from lora_scaffold.peft_api import (
    has_lora_variants,
    installed_peft_version,
    layer_api,
    parse_version,
)
from lora_scaffold.render import GeneratedFile, dora_blocker_for, render
from lora_scaffold.resolve import resolve_target


DESCRIPTION = """\
Generate a PEFT LoRA layer, and a pytest suite for it, for an nn.Module class PEFT cannot adapt yet.

TARGET is 'package.module.Class' or 'path/to/file.py:Class'. Resolving it imports that module, which runs its code.
"""

NEW_EPILOG = """\
strategies (how LoRA applies to the weight):
  linear     weight [out, in] (or [in, out]) used as x @ W.T: adds lora_B(lora_A(dropout(x))) * scaling
  conv       N-d convolution weight [out, in/groups, *k] (or a transposed one, [in, out/groups, *k]):
             lora_A convolves like the base layer, lora_B is a (grouped) 1x1 map
  embedding  lookup table [num, dim]: adds the looked-up rows of (B @ A).T * scaling
  delta      any weight, any forward: runs the module's own forward with W + (B @ A).reshape(W.shape) * scaling
  reuse      a subclass of nn.Linear/nn.ConvNd whose math is its parent's: a thin subclass of PEFT's own layer
  stub       a skeleton to fill in by hand
  auto       (default) probes the module numerically and takes the first factored strategy that is exact,
             else delta

DoRA (use_dora=True) goes through PEFT's own DoRA variants (peft >= 0.16) on linear and (ungrouped) conv
layers whose output the probe finds to be exactly the weight's map plus `bias`, as PEFT's DoRA assumes;
elsewhere the layer raises a ValueError saying why. `new` prints which one you got.

examples:
  lora-scaffold new mypkg.MyConv -o out/
  lora-scaffold new torch.nn.Bilinear -o out/ --arg in1_features=5 --arg in2_features=7 --arg out_features=3
  lora-scaffold new my_layers.py:Gate -o out/ --weight proj.weight --example-input 'torch.randn(2, 16)'
  lora-scaffold new torch.nn.ConvTranspose2d --peft-checkout ../peft --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-scaffold", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lora-scaffold {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    new = commands.add_parser(
        "new",
        help="generate a LoRA layer and its tests for TARGET",
        description="Generate a LoraLayer subclass for TARGET and a pytest suite that checks it.",
        epilog=NEW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target_arguments(new)
    _add_generation_arguments(new)
    new.add_argument("-o", "--output", metavar="DIR", help="plugin mode: folder to write into (default: .)")
    new.add_argument(
        "--peft-checkout",
        metavar="PATH",
        help="patch mode: add the layer to this peft source checkout (dispatch_default, exports, tests) instead",
    )
    new.add_argument("--dry-run", action="store_true", help="show what would change (a diff), write nothing")
    new.add_argument(
        "--force",
        action="store_true",
        help="overwrite files that exist with other content; in patch mode, also adapt a type PEFT already supports",
    )

    remove = commands.add_parser(
        "remove",
        help="take a generated layer back out of a peft checkout",
        description=(
            "Undo `new TARGET --peft-checkout PATH`: remove the layer module, its tests, the dispatch_default branch, "
            "the export and the test-battery entries, leaving the files as they were before. Refuses when what was "
            "added has been edited since, unless --force."
        ),
    )
    _add_target_arguments(remove)
    _add_generation_arguments(remove)
    remove.add_argument("--peft-checkout", metavar="PATH", required=True, help="the peft source checkout")
    remove.add_argument("--dry-run", action="store_true", help="show what would change (a diff), write nothing")
    remove.add_argument("--force", action="store_true", help="remove what lora-scaffold added even if it was edited")

    check = commands.add_parser(
        "check",
        help="re-render committed generated examples and report any that differ",
        description=(
            "Re-render every example listed in DIR/manifest.json ({folder: [new's arguments]}) and compare it with "
            "the files in DIR/folder. Exit 1, with a diff, when any differ; --update rewrites them instead."
        ),
    )
    check.add_argument("directory", metavar="DIR", nargs="?", default="generated_examples")
    check.add_argument("--update", action="store_true", help="rewrite stale examples")
    check.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")

    inspect = commands.add_parser(
        "inspect",
        help="show what lora-scaffold sees in TARGET",
        description="Show TARGET's constructor, parameters, buffers and the attributes PEFT reads.",
    )
    _add_target_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", metavar="NAME", help="parameter to adapt, e.g. weight or conv.weight")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto", help="how LoRA applies (default: auto)")
    parser.add_argument(
        "--example-input", metavar="EXPR", help="input for the probe and the tests, a Python expression"
    )
    parser.add_argument("--name", help="base name of the output: lora_NAME.py, LoraName (default: from the class)")


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="package.module.Class or path/to/file.py:Class")
    parser.add_argument(
        "--arg",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="constructor argument as a Python literal; repeatable",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except ScaffoldError as error:
        if args.debug:
            raise
        print(f"lora-scaffold: error: {error}", file=sys.stderr)
        return error.exit_code


def run_inspect(args: argparse.Namespace) -> int:
    spec = _introspect(args)
    if args.json:
        print(json.dumps(_spec_as_json(spec), indent=2))
    else:
        print(format_spec(spec))
    return 0


def run_new(args: argparse.Namespace) -> int:
    if args.peft_checkout:
        if args.output is not None:
            raise ScaffoldError("-o writes plugin files and --peft-checkout patches peft: give one of them, not both")
        return patch_checkout(args)
    spec, plan = plan_layer(args)
    installed = installed_peft_version()
    lora_variants = has_lora_variants(installed)
    files = render(plan, api=layer_api(installed), lora_variants=lora_variants)
    changes = plan_changes(files, Path(args.output or "."), force=args.force)
    refuse_conflicts(changes)
    print(format_plan(plan, spec, lora_variants))
    _apply_or_show(changes, args.dry_run)
    if spec.target.from_file is not None:
        print(
            f"note: the generated code imports {plan.target_module}; put {spec.target.from_file.parent} on PYTHONPATH"
        )
    return 0


def patch_checkout(args: argparse.Namespace) -> int:
    checkout = _read_supported_checkout(args.peft_checkout)
    spec, plan = plan_layer(args)
    if plan.peft_builtin_exact and not args.force:
        raise PatchError(
            f"PEFT already supports {plan.target_spec} with its own {plan.peft_builtin} layer; pass --force to put "
            "a branch for the generated layer before PEFT's"
        )
    patch = build_patch(plan, spec.target.cls, checkout)
    refuse_foreign_layer(checkout, patch, plan.target_spec)
    changes = _checkout_changes(checkout, patched_sources(checkout, patch), args.force)
    refuse_conflicts(changes)
    print(format_plan(plan, spec, has_lora_variants(parse_version(checkout.version))))
    if not any(change.changes_disk for change in changes):
        print(f"nothing to do: {checkout.root} already has {plan.layer_class} for {plan.target_spec}")
        return 0
    _apply_or_show(changes, args.dry_run)
    if plan.battery_blocker:
        print(f"note: not wired into {BATTERY_FILE}: {plan.battery_blocker}; {patch.test_path} covers the layer")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    checkout = _read_supported_checkout(args.peft_checkout)
    args = _arguments_new_used(args, checkout)
    spec, plan = plan_layer(args)
    patch = build_patch(plan, spec.target.cls, checkout)
    refuse_foreign_layer(checkout, patch, plan.target_spec)
    edited = edited_by_user(checkout, patch)
    if edited and not args.force:
        raise PatchError(f"{', '.join(edited)} changed since lora-scaffold wrote it; pass --force to remove it anyway")
    changes = _checkout_changes(checkout, unpatched_sources(checkout, patch, args.force), force=True)
    changes += plan_deletions([checkout_path(checkout, path) for path in patch.new_files])
    if not any(change.changes_disk for change in changes):
        print(f"nothing to remove: {checkout.root} has no {plan.layer_class} for {plan.target_spec}")
        return 0
    _apply_or_show(changes, args.dry_run)
    return 0


def _read_supported_checkout(path: str) -> PeftCheckout:
    checkout = read_checkout(path)
    layer_api(parse_version(checkout.version))  # refuses peft < 0.13
    return checkout


def _arguments_new_used(args: argparse.Namespace, checkout: PeftCheckout) -> argparse.Namespace:
    """`remove` regenerates exactly what `new` wrote, with the arguments recorded in the layer module's header."""
    class_name = args.target.rpartition(":" if ":" in args.target else ".")[2]
    _, module_name = layer_names(class_name, args.name)
    layer = checkout_path(checkout, f"{LORA_PACKAGE}/{module_name}.py")
    if not layer.is_file():
        return args
    header = layer.read_text(encoding="utf-8").splitlines()[1:2]
    words = shlex.split(header[0].lstrip("# ")) if header else []
    if words[:2] != ["lora-scaffold", "new"]:
        return args
    recorded = build_parser().parse_args([*words[1:], "--peft-checkout", args.peft_checkout])
    recorded.force, recorded.dry_run, recorded.debug = args.force, args.dry_run, args.debug
    return recorded


def _checkout_changes(checkout: PeftCheckout, files: tuple[GeneratedFile, ...], force: bool) -> tuple[FileChange, ...]:
    for generated in files:
        safe_path(checkout.root, generated.path)
    return plan_changes(files, checkout.root, force=force, edits=EDITED_FILES)


def _apply_or_show(changes: tuple[FileChange, ...], dry_run: bool) -> None:
    if dry_run:
        for change in changes:
            print(f"would {change.status:<9} {change.path}")
            if change.changes_disk:
                print(change.diff(), end="")
        return
    apply_changes(changes)
    for change in changes:
        print(f"{change.status:<9} {change.path}")


def run_check(args: argparse.Namespace) -> int:
    root = Path(args.directory)
    stale = []
    for folder, new_arguments in load_manifest(root).items():
        _, plan = plan_layer(build_parser().parse_args(["new", *new_arguments]))
        changes = plan_changes(render(plan), root / folder, force=True)
        changed = [change for change in changes if change.writes]
        for change in changed:
            print(change.diff(), end="")
        if changed:
            stale.append(folder)
        if args.update:
            apply_changes(changes)
    if args.update:
        print(f"updated {len(stale)} of the examples in {root}" + (f": {', '.join(stale)}" if stale else ""))
    elif stale:
        raise StaleOutputError(
            f"generated examples {', '.join(stale)} differ from a fresh render; refresh: lora-scaffold check {root} --update"
        )
    else:
        print(f"all examples in {root} are up to date")
    return 0


def load_manifest(root: Path) -> dict[str, list[str]]:
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScaffoldError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, list) for v in manifest.values()):
        raise ScaffoldError(f"{path} should map each example folder to a list of `lora-scaffold new` arguments")
    return manifest


def plan_layer(args: argparse.Namespace) -> tuple[TargetSpec, LayerPlan]:
    """Resolve, introspect and analyse: everything up to rendering."""
    spec = _introspect(args)
    options = Options(weight=args.weight, strategy=args.strategy, example_input=args.example_input, name=args.name)
    return spec, analyse(spec, options)


def _introspect(args: argparse.Namespace) -> TargetSpec:
    overrides = parse_arg_overrides(args.arg)
    return introspect(resolve_target(args.target), overrides)


def format_spec(spec: TargetSpec) -> str:
    guessed = f"  (guessed: {', '.join(spec.guessed_args)})" if spec.guessed_args else ""
    lines = [f"class       {spec.target.qualified_name}"]
    lines.append("signature   (" + ", ".join(_format_param(p) for p in spec.ctor_params) + ")")
    lines.append("built with  (" + ", ".join(f"{n}={v}" for n, v in spec.ctor_args) + ")" + guessed)
    for name, old, new in spec.scaled_args:
        lines.append(f"scaled      {name}: {old} -> {new} (the defaults build more than a million weights)")
    lines.append(f"forward     {spec.forward_arity} positional input(s)")
    lines += ["parameters"] + ([f"  {p.name:<24} {list(p.shape)} {p.dtype}" for p in spec.parameters] or ["  none"])
    lines += ["buffers"] + ([f"  {b.name:<24} {list(b.shape)} {b.dtype}" for b in spec.buffers] or ["  none"])
    lines += ["attributes"] + ([f"  {n:<24} {v}" for n, v in spec.attributes] or ["  none"])
    return "\n".join(lines)


def _format_param(param) -> str:
    return param.name if param.required else f"{param.name}={param.default}"


def format_plan(plan: LayerPlan, spec: TargetSpec, lora_variants: bool) -> str:
    inferred = "inferred" if plan.input_inferred else "given"
    scaled = "".join(
        f"\nscaled    {name} {old} -> {new} to keep the probe and tests small" for name, old, new in spec.scaled_args
    )
    lines = [
        f"target    {plan.target_spec}(" + ", ".join(f"{n}={v}" for n, v in plan.ctor_args) + ")" + scaled,
        f"weight    {plan.weight_name} {list(plan.weight_shape)}",
        f"input     {plan.example_input} ({inferred})",
        f"strategy  {plan.strategy}: {plan.reason}",
        f"dora      {_dora_line(plan, lora_variants)}",
    ]
    if plan.peft_builtin and not plan.peft_builtin_exact:
        lines.append(
            f"note      PEFT's own {plan.peft_builtin} layer would catch this subclass; this layer takes precedence"
        )
    elif plan.peft_builtin:
        lines.append(
            f"note      PEFT has its own {plan.peft_builtin} layer for this type; registering this one overrides it"
        )
    return "\n".join(lines)


def _dora_line(plan: LayerPlan, lora_variants: bool) -> str:
    blocker = dora_blocker_for(plan, lora_variants)
    if blocker:
        return f"refused (use_dora=True raises): {blocker}"
    return "PEFT's own" if plan.strategy == "reuse" else "through PEFT's DoRA variant"


def _spec_as_json(spec: TargetSpec) -> dict:
    data = asdict(spec)
    data["target"] = {"spec": spec.target.spec, "class": spec.target.qualified_name}
    return data


COMMANDS = {"new": run_new, "remove": run_remove, "inspect": run_inspect, "check": run_check}
