"""The one exception type that carries a message for the user; the CLI turns it into one line and an exit code."""

BAD_INPUT = 2
FAILURE = 1
# What code of the user's (the target's module, constructor and forward, an --example-input) may raise: a
# sys.exit() in it must become an error message, not the end of lora-scaffold.
USER_CODE_ERRORS = (Exception, SystemExit)


class ScaffoldError(Exception):
    """An expected problem, explained in one line. Anything else escaping the pipeline is a bug."""

    exit_code = BAD_INPUT

    def __str__(self) -> str:
        # Messages quote other libraries' errors, which may run over several lines.
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class TargetError(ScaffoldError):
    """The target class cannot be found, imported or built."""


class AnalysisError(ScaffoldError):
    """No correct way to apply LoRA could be chosen with the given options."""


class WeightUnused(AnalysisError):
    """The module's output does not move with the weight: its forward does not read it (a parent may)."""


class NotCalled(AnalysisError):
    """The model's forward on its input never calls the submodule (a tied embedding the encoder reaches by another
    name, an expert no token is routed to)."""


class WriteError(ScaffoldError):
    """Writing the output would overwrite something, or failed."""


class StaleOutputError(ScaffoldError):
    """Committed generated files differ from a fresh render."""

    exit_code = FAILURE


class RenderError(ScaffoldError):
    """A rendered file does not parse: a bug in lora-scaffold, never the user's fault."""

    exit_code = FAILURE


class PatchError(ScaffoldError):
    """The checkout does not look as expected, or the user edited what lora-scaffold added."""


class MergeConflictError(ScaffoldError):
    """`update` found a hunk both the user and the new render changed; nothing was written."""

    exit_code = FAILURE
