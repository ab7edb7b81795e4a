"""What the user asks `new` for, as plain data: it is what the generation record keeps, and what `check` reads from
a manifest, so that a layer can be generated again exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from lora_scaffold.errors import ScaffoldError


@dataclass(frozen=True)
class ModelCall:
    """The call MODEL makes to its submodule MODULE when fed MODEL_INPUT (a dict of keyword inputs, or positional
    inputs: a tuple or one tensor), as expressions the generated tests evaluate again (`capture.recorded_call`)."""

    model: str
    module: str
    model_input: str


@dataclass(frozen=True)
class Options:
    """How the layer is made, as analysis reads it."""

    weight: str | None = None
    strategy: str = "auto"  # strategies.AUTO: analysis chooses
    example_input: str | None = None
    name: str | None = None
    model_call: ModelCall | None = None  # --from-model: the input is what the model passes to the target


@dataclass(frozen=True)
class Request:
    target: str
    args: tuple[str, ...] = ()  # NAME=VALUE, values Python literals
    weight: str | None = None
    strategy: str = "auto"
    example_input: str | None = None
    name: str | None = None
    init: str | None = None  # an expression that builds the target, instead of args
    # --from-model: the model (as generated code builds it), the submodule, and the model's input; the target is then
    # that submodule's class, built by `init` from the model, and called as the model calls it.
    model: str | None = None
    module: str | None = None
    model_input: str | None = None

    @property
    def model_call(self) -> ModelCall | None:
        if self.model is None or self.module is None or self.model_input is None:
            return None
        return ModelCall(self.model, self.module, self.model_input)

    @property
    def options(self) -> Options:
        return Options(
            weight=self.weight,
            strategy=self.strategy,
            example_input=self.example_input,
            name=self.name,
            model_call=None if self.example_input else self.model_call,
        )

    def as_dict(self) -> dict:
        data = asdict(self)
        data["args"] = list(self.args)
        if self.model is None:  # records of targets not taken from a model keep their shape
            del data["model"], data["module"], data["model_input"]
        return data

    def updated(self, args: tuple[str, ...] = (), **options: str | None) -> Request:
        """This request with `args` replacing recorded arguments of the same NAME, and the options given (not None)."""
        given = {arg.partition("=")[0].strip(): arg for arg in args}
        kept = tuple(arg for arg in self.args if arg.partition("=")[0].strip() not in given)
        changed = {key: value for key, value in options.items() if value is not None}
        return replace(self, args=kept + tuple(given.values()), **changed)

    @classmethod
    def from_dict(cls, data: object, where: str) -> Request:
        """A clear error, naming `where`, for anything but a dict of the fields above with values of their types."""
        if not isinstance(data, dict):
            raise ScaffoldError(f"{where}: expected an object with a `target`, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScaffoldError(f"{where}: unknown option {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if not isinstance(data.get("target"), str):
            raise ScaffoldError(f"{where}: `target` must be a string such as 'torch.nn.Conv2d'")
        args = data.get("args", [])
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise ScaffoldError(f"{where}: `args` must be a list of NAME=VALUE strings")
        for key in ("weight", "example_input", "name", "strategy", "init", "model", "module", "model_input"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ScaffoldError(f"{where}: `{key}` must be a string")
        return cls(**{**data, "args": tuple(args), "strategy": data.get("strategy") or "auto"})
