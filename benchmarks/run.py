"""The performance benchmark (issue 11). From the repository root:

    python -m benchmarks.run                     # writes benchmarks/RESULTS.md (about 10 minutes)
    python -m benchmarks.run --tiny -o OUT.md    # every case on tiny sizes, one round: checks that it runs

It generates the layers it measures with lora-scaffold, then times each against its fairest peer in one process:
PEFT's built-in layer for factored strategies, PEFT's `LoraConfig(target_parameters=[...])` (`ParamWrapper`) for
the delta strategy, the plain module for merged layers. Rounds are interleaved and each ratio is taken within a
round, so machine noise moves both sides; min / median / max of the per-round ratios are reported.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.benchmark import Timer
from torch.utils.weak import WeakIdKeyDictionary

import lora_scaffold
from lora_scaffold.request import Request
from lora_scaffold.workflow import new_plugin


HERE = Path(__file__).resolve().parent
# What generation feeds a small expert bank (16 wide, 4 experts): six tokens, two experts each, and their weights.
ROUTED = "(torch.randn(6, 16), torch.randint(0, 4, (6, 2)), torch.softmax(torch.randn(6, 2), -1))"
RANK = 8
PEFT_SDIST_VERSION = "0.21.2"


@dataclass(frozen=True)
class Case:
    """One layer to measure: what lora-scaffold generates, the module at benchmark size and its inputs."""

    name: str
    request: Request
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    # "builtin" (PEFT's own layer for this module), "param_wrapper", "materialised" (ours without the factored path)
    peers: tuple[str, ...]
    small: bool = False  # the per-call overhead goals differ for small layers
    delta: bool = False  # generated with the delta strategy (whose peer is ParamWrapper where it takes the weight)
    # A quantized base (`beside`): built anew for each contender (some cannot be deep-copied), its merge is a
    # requantization, not measured; `model_flags` are what PEFT's peer reads off the model (bitsandbytes').
    quantized: bool = False
    model_flags: tuple[tuple[str, object], ...] = ()
    weight: str = "weight"  # the adapted weight, from the module built
    target: str = ""  # the submodule the generated layer replaces ("": the module built)
    rank: int = RANK
    moe: bool = False  # an expert bank at issue 22's shapes, with its goals


@dataclass(frozen=True)
class Figure:
    case: str
    measure: str
    ratios: tuple[float, ...]  # one per round, or a single value
    goal: float | None = None
    unit: str = "x"

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> str:
        return "" if self.goal is None else ("yes" if self.median <= self.goal else "**no**")

    def cells(self) -> list[str]:
        if self.unit == "x":
            spread = f"{min(self.ratios):.3f} / **{self.median:.3f}** / {max(self.ratios):.3f}"
        else:
            spread = f"**{self.median:.2f} {self.unit}**"
        goal = "" if self.goal is None else f"<= {self.goal:g}{' ' + self.unit if self.unit != 'x' else 'x'}"
        return [self.case, self.measure, spread, goal, self.met]


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cases(tiny: bool) -> list[Case]:
    from benchmarks.targets import (
        StackedExperts,
        WSConv2d,
        bnb_linear4,
        hqq_linear,
        mixtral_experts,
        qwen3_moe_block,
        routed_tokens,
        torchao_int8_linear,
    )

    def size(full: int, small: int) -> int:
        return small if tiny else full

    big, batch = size(1024, 16), size(256, 4)
    channels, side = size(64, 4), size(32, 6)
    vocab, dim = size(32000, 50), size(512, 8)
    experts, expert_dim, tokens = size(8, 2), size(256, 8), size(64, 4)
    # issue 22's MoE shapes: 32 experts, hidden 512, intermediate 1024, 512 tokens routed top-2, rank 16
    moe_experts, moe_hidden, moe_intermediate, moe_tokens = size(32, 4), size(512, 16), size(1024, 32), size(512, 6)
    moe = (
        f"{moe_experts} experts, hidden {moe_hidden}, intermediate {moe_intermediate}, {moe_tokens} tokens top-2, r 16"
    )
    linear = Request("torch.nn.Linear", args=("in_features=16", "out_features=12"))
    conv = Request("torch.nn.Conv2d", args=("in_channels=4", "out_channels=6", "kernel_size=3"))
    return [
        Case(
            "Linear 1024x1024, batch 256",
            linear,
            lambda: nn.Linear(big, big),
            lambda: (torch.randn(batch, big),),
            ("builtin",),
        ),
        Case(
            "Conv2d 64->64 3x3 on 8x64x32x32",
            conv,
            lambda: nn.Conv2d(channels, channels, 3, padding=1),
            lambda: (torch.randn(8, channels, side, side),),
            ("builtin",),
        ),
        Case(
            "Embedding 32000x512, 8x512 ids",
            Request("torch.nn.Embedding", args=("num_embeddings=20", "embedding_dim=6")),
            lambda: nn.Embedding(vocab, dim),
            lambda: (torch.randint(0, vocab, (8, dim)),),
            ("builtin",),
        ),
        Case(
            "Linear 64x64, batch 8",
            linear,
            lambda: nn.Linear(64, 64),
            lambda: (torch.randn(8, 64),),
            ("builtin",),
            small=True,
        ),
        Case(
            "Conv2d 8->8 3x3 on 2x8x8x8",
            conv,
            lambda: nn.Conv2d(8, 8, 3, padding=1),
            lambda: (torch.randn(2, 8, 8, 8),),
            ("builtin",),
            small=True,
        ),
        Case(
            "delta: Linear 1024x1024, batch 256",
            _delta(linear, "linear_delta"),
            lambda: nn.Linear(big, big),
            lambda: (torch.randn(batch, big),),
            ("builtin", "param_wrapper", "materialised"),
            delta=True,
        ),
        Case(
            "delta: Linear 64x64, batch 8",
            _delta(linear, "linear_delta"),
            lambda: nn.Linear(64, 64),
            lambda: (torch.randn(8, 64),),
            ("builtin", "param_wrapper"),
            small=True,
            delta=True,
        ),
        Case(
            "delta: weight-standardised Conv2d 64->64 3x3 on 8x64x32x32",
            Request("benchmarks.targets.WSConv2d", args=("in_channels=4", "out_channels=6", "kernel_size=3")),
            lambda: WSConv2d(channels, channels, 3, padding=1),
            lambda: (torch.randn(8, channels, side, side),),
            (),
            delta=True,
        ),
        Case(
            "delta: Bilinear 256x256->256, batch 64",
            Request("torch.nn.Bilinear"),
            lambda: nn.Bilinear(size(256, 6), size(256, 6), size(256, 5)),
            lambda: (torch.randn(size(64, 3), size(256, 6)), torch.randn(size(64, 3), size(256, 6))),
            ("param_wrapper",),
            delta=True,
        ),
        Case(
            "experts: stacked experts [8, 256, 256], 64 tokens each",
            Request("benchmarks.targets.StackedExperts", example_input="torch.randn(4, 3, 6)"),
            lambda: StackedExperts(experts, expert_dim, expert_dim),
            lambda: (torch.randn(experts, tokens, expert_dim),),
            ("param_wrapper",),
            delta=True,
        ),
        Case(
            f"experts: Mixtral's expert bank (grouped_mm), gate_up_proj; {moe}",
            Request(
                "transformers.models.mixtral.modeling_mixtral.MixtralExperts",
                init="benchmarks.targets.mixtral_experts()",
                weight="gate_up_proj",
                example_input=ROUTED,
            ),
            lambda: mixtral_experts(moe_hidden, moe_intermediate, moe_experts),
            lambda: routed_tokens(moe_tokens, moe_hidden, moe_experts),
            ("param_wrapper", "materialised"),
            delta=True,
            weight="gate_up_proj",
            rank=16,
            moe=True,
        ),
        Case(
            f"experts: Qwen3-MoE's sparse block (router and grouped_mm experts), gate_up_proj; {moe}",
            Request(
                "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
                init="benchmarks.targets.qwen3_moe_block().experts",
                weight="gate_up_proj",
                example_input=ROUTED,
            ),
            lambda: qwen3_moe_block(moe_hidden, moe_intermediate, moe_experts),
            lambda: (torch.randn(1, moe_tokens, moe_hidden),),
            ("param_wrapper", "materialised"),
            delta=True,
            weight="experts.gate_up_proj",
            target="experts",
            rank=16,
            moe=True,
        ),
        Case(
            "beside: hqq 4-bit HQQLinear 1024x1024, batch 256",
            Request("hqq.core.quantize.HQQLinear", init="benchmarks.targets.hqq_linear()", name="hqq_beside"),
            lambda: hqq_linear(big, big),
            lambda: (torch.randn(batch, big),),
            ("builtin",),
            quantized=True,
        ),
        Case(
            "beside: torchao int8 weight-only Linear 1024x1024, batch 256",
            Request("torch.nn.Linear", init="benchmarks.targets.torchao_int8_linear()", name="torchao_beside"),
            lambda: torchao_int8_linear(big, big),
            lambda: (torch.randn(batch, big),),
            ("builtin",),
            quantized=True,
        ),
        Case(
            "beside: bitsandbytes nf4 Linear4bit 1024x1024, batch 256",
            Request("bitsandbytes.nn.Linear4bit", init="benchmarks.targets.bnb_linear4()", name="bnb4_beside"),
            lambda: bnb_linear4(size(1024, 64), size(1024, 64)),  # its CPU kernel packs blocks of 32 and more
            lambda: (torch.randn(batch, size(1024, 64)),),
            ("builtin",),
            quantized=True,
            model_flags=(("is_loaded_in_4bit", True),),
        ),
    ]


def _delta(request: Request, name: str) -> Request:
    return Request(request.target, args=request.args, strategy="delta", name=name)


# -- generating and wrapping the layers


def generate(requests: list[Request], folder: Path) -> dict[Request, object]:
    """Each distinct request rendered by lora-scaffold into a folder of its own, imported as a module."""
    layers = {}
    for index, request in enumerate(dict.fromkeys(requests)):
        output = folder / f"layer{index}"
        outcome = new_plugin(request, output)
        outcome.apply()
        source = next(change.path for change in outcome.changes if change.path.name.startswith("lora_"))
        spec = importlib.util.spec_from_file_location(f"bench_layer{index}_{source.stem}", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        layers[request] = module
    return layers


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs):
        return self.layer(*inputs)


def adapted(base: nn.Module, kind: str, case: Case, generated=None) -> nn.Module:
    """The module PEFT adapts for one contender (the module itself, not the PeftModel around it, so that only its own
    cost is measured), with the generated layer, PEFT's, or ParamWrapper on `case.target`. `base` is copied, or taken
    as it is when a callable builds it."""
    options = {"r": case.rank, "lora_alpha": 2 * case.rank, "init_lora_weights": False}
    if kind == "param_wrapper":
        config = LoraConfig(target_modules=None, target_parameters=[f"layer.{case.weight}"], **options)
    else:
        config = LoraConfig(target_modules=[".".join(filter(None, ("layer", case.target)))], **options)
        if kind == "generated":
            generated.register(config)
    holder = Holder(base() if callable(base) and not isinstance(base, nn.Module) else copy.deepcopy(base))
    for name, value in case.model_flags if kind != "generated" else ():
        setattr(holder, name, value)
    model = get_peft_model(holder, config)
    return model.base_model.model.layer, model


def without_factored_path(adapted_module: nn.Module, generated) -> nn.Module:
    """The generated layers in the module with their factored path turned off: the base runs with W + dW in training
    too, as where the proof does not hold."""
    owner_name, _, attribute = generated.WEIGHT_NAME.rpartition(".")
    for layer in adapted_module.modules():
        if isinstance(layer, LoraLayer):
            owner = layer.get_base_layer().get_submodule(owner_name)

            def materialised(weight, adapters, *args, layer=layer, owner=owner, **kwargs):
                effective = layer._effective_weight(weight, adapters)
                return layer._forward_with_weight(owner, attribute, effective, *args, **kwargs)

            layer._forward_factored = materialised
    return adapted_module


# -- measuring


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, block: float) -> dict[str, list[float]]:
    """Seconds per call of each contender, one value per round; the order alternates between rounds."""
    numbers = {name: _calls_per_block(function, block) for name, function in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else reversed(order):
            timer = Timer(stmt="function()", globals={"function": contenders[name]})
            times[name].append(timer.timeit(numbers[name]).mean)
    return times


def _calls_per_block(function: Callable[[], object], block: float) -> int:
    for _ in range(3):
        function()  # warm up: first calls allocate and pick kernels
    start = time.perf_counter()
    function()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(block / once))


def ratios(times: dict[str, list[float]], name: str, baseline: str) -> tuple[float, ...]:
    return tuple(mine / theirs for mine, theirs in zip(times[name], times[baseline]))


def train_step(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    layer.train()

    def step():
        layer.zero_grad(set_to_none=True)
        layer(*inputs).sum().backward()

    return step


def eval_call(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return layer(*inputs)

    return call


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages that ops create while it is active (forward and backward alike), freed storages
    subtracted as they die. torch's MemTracker would do this but refuses modules with frozen parameters."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return output

    def _count(self, storage) -> None:
        if storage in self.live:
            return
        self.live[storage] = size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size


def peak_train_memory(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Peak bytes a training step allocates beyond what exists before it (gradients, activations, temporaries)."""
    step = train_step(layer, inputs)
    step()
    layer.zero_grad(set_to_none=True)
    with PeakMemory() as tracker:
        step()
    return tracker.peak


def output_difference(left: nn.Module, right: nn.Module, inputs) -> float:
    with torch.no_grad():
        return (left(*inputs) - right(*inputs)).abs().max().item()


def training_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # The adapted layer usually sits inside a network, where its input needs a gradient too.
    return tuple(x.clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs)


PEER_NAMES = {
    "builtin": "PEFT's built-in layer",
    "param_wrapper": "PEFT's ParamWrapper (target_parameters)",
    "materialised": "the same layer materialising W + dW",
}


def measure_case(case: Case, generated, rounds: int, block: float, results: Results) -> None:
    torch.manual_seed(0)
    inputs = case.inputs()
    base = _seeded(case.build) if case.quantized else case.build()
    source = (lambda: _seeded(case.build)) if case.quantized else base
    ours, _ = adapted(source, "generated", case, generated)
    peers = {
        kind: without_factored_path(adapted(source, "generated", case, generated)[0], generated)
        if kind == "materialised"
        else adapted(source, kind, case)[0]
        for kind in case.peers
    }
    if not peers:
        results.notes.append(f"{case.name}: no PEFT peer (ParamWrapper takes 2-D and 3-D parameters only)")
    # Training first: bitsandbytes' 4-bit layer re-packs its weight on an eval-mode forward on the CPU, after which a
    # training forward on an input needing a gradient raises.
    _measure_training(case, base, ours, peers, training_inputs(inputs), (rounds, block), results)
    _compare_outputs(case, ours, peers, inputs, results)
    _measure_eval(case, base, ours, peers, inputs, (rounds, block), results)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(1)
    return build()


def _compare_outputs(case: Case, ours: nn.Module, peers: dict, inputs, results: Results) -> None:
    for kind, peer in peers.items():
        if _same_adapter_shapes(ours, peer):
            copy_adapter_weights(ours, peer)
            difference = output_difference(ours.eval(), peer.eval(), inputs)
            results.notes.append(f"{case.name}: max |output difference| to {PEER_NAMES[kind]}: {difference:.2e}")


def _measure_training(case: Case, base, ours, peers: dict, inputs, timing: tuple[int, float], results: Results):
    contenders = {"ours": train_step(ours, inputs)} | {kind: train_step(peer, inputs) for kind, peer in peers.items()}
    if not peers:
        contenders["plain"] = train_step(copy.deepcopy(base).requires_grad_(False), inputs)
    times = interleaved(contenders, *timing)
    if not peers:
        results.figures.append(
            Figure(case.name, "train fwd+bwd / plain module (frozen)", ratios(times, "ours", "plain"))
        )
    for kind, peer in peers.items():
        goal = _train_goal(case, kind)
        results.figures.append(
            Figure(case.name, f"train fwd+bwd / {PEER_NAMES[kind]}", ratios(times, "ours", kind), goal)
        )
        memory = peak_train_memory(ours, inputs) / peak_train_memory(peer, inputs)
        results.figures.append(
            Figure(case.name, f"peak train-step memory / {PEER_NAMES[kind]}", (memory,), _memory_goal(case, kind))
        )


def _measure_eval(case: Case, base, ours, peers: dict, inputs, timing: tuple[int, float], results: Results):
    for layer in (ours, *peers.values()):
        layer.eval()
    plain = (_seeded(case.build) if case.quantized else copy.deepcopy(base)).eval()
    contenders = {"ours": eval_call(ours, inputs), "plain": eval_call(plain, inputs)} | {
        kind: eval_call(peer, inputs) for kind, peer in peers.items()
    }
    times = interleaved(contenders, *timing)
    for kind in peers:
        goal = None if case.delta else (0.9 if case.small else 1.0)
        results.figures.append(Figure(case.name, f"eval / {PEER_NAMES[kind]}", ratios(times, "ours", kind), goal))
    results.figures.append(
        Figure(
            case.name,
            "eval (no grad) / plain module",
            ratios(times, "ours", "plain"),
            1.2 if case.moe else 1.05 if case.delta else None,
        )
    )
    if case.quantized:
        return  # merging requantizes: the merged layer is the library's own, whose cost is not ours
    for layer in ours.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    times = interleaved({"merged": eval_call(ours, inputs), "plain": eval_call(plain, inputs)}, *timing)
    results.figures.append(
        Figure(case.name, "merged / plain module", ratios(times, "merged", "plain"), 1.10 if case.small else None)
    )


def _train_goal(case: Case, kind: str) -> float | None:
    if kind == "materialised":
        return None
    if not case.delta:
        return 0.9 if case.small else 1.0
    if kind == "param_wrapper":
        return 0.6 if case.moe else 1.0
    return None if case.small else 1.1  # issue 22: delta on a Linear-like use, factored


def _memory_goal(case: Case, kind: str) -> float | None:
    if kind == "param_wrapper":
        return 0.5 if case.moe else 1.0
    return 1.1 if kind == "builtin" and case.delta and not case.small else None


def _same_adapter_shapes(ours: nn.Module, peer: nn.Module) -> bool:
    def shapes(layer):
        return {name: tuple(p.shape) for name, p in layer.named_parameters() if "lora_" in name}

    return shapes(ours) == shapes(peer)


def copy_adapter_weights(ours: nn.Module, peer: nn.Module) -> None:
    """Give our layer the peer's adapter weights, so that their outputs can be compared."""
    adapter = {name: p for name, p in peer.state_dict().items() if "lora_" in name}
    missing = ours.load_state_dict(adapter, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys


# -- the command line


def cpu_seconds(command: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), completed


def measure_cli(folder: Path, sdist: Path, rounds: int, results: Results) -> None:
    environment = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    torch_times, new_times = [], []
    for round_ in range(rounds):
        torch_times.append(cpu_seconds([sys.executable, "-c", "import torch"], env=environment)[0])
        command = [sys.executable, "-m", "lora_scaffold", "new", "mypkg.MyConv", "-o", str(folder / f"cli{round_}")]
        new_times.append(cpu_seconds(command, env=environment)[0])
    ratio = tuple(new / torch_ for new, torch_ in zip(new_times, torch_times))
    results.figures.append(
        Figure("CLI", "`new mypkg.MyConv -o DIR` CPU time / `python -c 'import torch'`", ratio, 1.3)
    )

    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "cli0")]
    completed = cpu_seconds(command, env=environment)[1]
    suite = (time.perf_counter() - start,)
    passed = re.search(r"(\d+) passed", completed.stdout)
    measure = f"generated suite for mypkg.MyConv ({passed.group(1) if passed else '?'} tests), wall time"
    results.figures.append(Figure("CLI", measure, suite, unit="s"))

    work = []
    for round_ in range(rounds):
        checkout = unpack_peft(sdist, folder / f"peft{round_}")
        patch = ["new", "mypkg.MyConv", "--peft-checkout", str(checkout)]
        work.append(command_seconds_beyond_imports(patch, environment))
    measure = f"patch mode on a peft {PEFT_SDIST_VERSION} checkout: wall time beyond imports"
    results.figures.append(Figure("CLI", measure, tuple(work), 1.0, unit="s"))


MAIN_TIMER = """
import sys, time
from lora_scaffold.cli import main
print("-- main starts", file=sys.stderr, flush=True)
start = time.perf_counter()
code = main(sys.argv[1:])
print(f"-- main took {time.perf_counter() - start}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def command_seconds_beyond_imports(arguments: list[str], environment: dict[str, str]) -> float:
    """Seconds `lora-scaffold ARGUMENTS` spends once the CLI module is imported, less the imports it makes then."""
    command = [sys.executable, "-X", "importtime", "-c", MAIN_TIMER, *arguments]
    _, completed = cpu_seconds(command, env=environment)
    during_main = completed.stderr.split("-- main starts", 1)[1]
    took = float(re.search(r"-- main took (\S+)", during_main).group(1))
    return took - import_seconds(during_main)


def import_seconds(importtime_log: str) -> float:
    """The total of `-X importtime`'s top-level (unindented) imports: every import, counted once."""
    total = 0
    for line in importtime_log.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if match and not match.group(2).startswith(" "):
            total += int(match.group(1))
    return total / 1e6


def peft_sdist(given: str | None) -> Path:
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-scaffold"
    archive = cache / f"peft-{PEFT_SDIST_VERSION}.tar.gz"
    if not archive.exists():
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"peft=={PEFT_SDIST_VERSION}", "-d", str(cache)], check=True)
    return archive


def unpack_peft(archive: Path, folder: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder / f"peft-{PEFT_SDIST_VERSION}"


# -- the report


# Quantization libraries `import peft` imports when they are installed (the test extra installs them): they count
# in every command's time, the CLI row's included.
PEFT_IMPORTS_WHEN_INSTALLED = ("bitsandbytes", "hqq", "torchao")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    model = _cpu_model()
    present = [name for name in PEFT_IMPORTS_WHEN_INSTALLED if importlib.util.find_spec(name) is not None]
    imported = f"; `import peft` also imports {', '.join(present)}, installed here" if present else ""
    return (
        f"{model or cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"peft {__import__('peft').__version__}, Python {platform.python_version()}, {platform.system()}{imported}"
    )


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def report(results: Results, rounds: int, seconds: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python -m benchmarks.run` (lora-scaffold "
        f"{lora_scaffold.__version__}), {rounds} interleaved rounds, in {seconds / 60:.1f} minutes.",
        f"Machine: {machine()}.",
        "",
        "Ratios are ours / theirs within one round (below 1: we are faster), min / **median** / max over the rounds;",
        "the goal (issue 11) is judged on the median. r = 8, float32, CPU; `eval` runs under `torch.no_grad()`; the",
        "train step is forward + backward of the output's sum, with the input requiring a gradient (as inside a",
        "network); memory is the peak of what one train step allocates (gradients, activations, temporaries), counted",
        "by a dispatch mode over every storage the step's ops create.",
        "",
        "| case | measure | ratio min / **median** / max | goal | met |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(figure.cells()) + " |" for figure in results.figures]
    if results.notes:
        lines += ["", "Outputs, with our layer given the peer's adapter weights (float32):", ""]
        lines += [f"- {note}" for note in results.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and one round: checks that everything runs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, or 1 with --tiny)")
    parser.add_argument("-o", "--output", type=Path, default=HERE / "RESULTS.md", help="the Markdown table to write")
    parser.add_argument("--peft-sdist", help="a peft 0.21.2 sdist for the patch-mode timing (default: download once)")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the command-line timings")
    parser.add_argument(
        "--only", metavar="TEXT", help="only the cases whose name holds TEXT (with --skip-cli: a quick look)"
    )
    options = parser.parse_args(argv)
    rounds = options.rounds or (1 if options.tiny else 15)
    block = 0.002 if options.tiny else 0.1
    started = time.perf_counter()
    results = Results()
    all_cases = [case for case in cases(options.tiny) if options.only is None or options.only in case.name]
    with tempfile.TemporaryDirectory() as folder:
        generated = generate([case.request for case in all_cases], Path(folder))
        for case in all_cases:
            print(f"measuring {case.name}", file=sys.stderr)
            measure_case(case, generated[case.request], rounds, block, results)
        if not options.skip_cli:
            print("measuring the command line", file=sys.stderr)
            measure_cli(Path(folder), peft_sdist(options.peft_sdist), min(rounds, 3), results)
        shutil.rmtree(folder, ignore_errors=True)
    options.output.write_text(report(results, rounds, time.perf_counter() - started))
    print(f"wrote {options.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
