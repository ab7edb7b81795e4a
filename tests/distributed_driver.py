"""Two-process runs of a generated layer for tests/test_distributed.py (gloo on 127.0.0.1, CPU):

    python distributed_driver.py CASE LAYER_FILE PORT OUT

runs DDP, FSDP2, FSDP2 with bf16 parameters and FSDP2 with the base module as a unit of its own one training step each on the case's global batch, split between
the ranks, and has rank 0 save what the test compares with a single-process step (`OUT/<engine>.pt`).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn


WORLD_SIZE = 2
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class Case:
    """A target, how lora-scaffold is asked for its layer, and a global batch with the dimension split by rank."""

    target: str
    args: tuple[str, ...]
    build: Callable[[], nn.Module]
    batch: Callable[[], torch.Tensor]
    split_dim: int = 0
    example_input: str | None = None


def _conv():
    from mypkg import MyConv

    return MyConv(4, 6)


def _normalized_linear():
    from scaffold_targets import NormalizedLinear

    return NormalizedLinear(6, 5)


def _relu_linear():
    from scaffold_targets import ReluLinear

    return ReluLinear(6, 5)


def _experts():
    from benchmarks.targets import StackedExperts

    return StackedExperts(3, 6, 5)


CASES = {
    "conv": Case("mypkg.MyConv", ("in_channels=4", "out_channels=6"), _conv, lambda: torch.randn(4, 4, 6, 6)),
    "delta": Case(
        "scaffold_targets.NormalizedLinear",
        ("in_features=6", "out_features=5"),
        _normalized_linear,
        lambda: torch.randn(4, 6),
    ),
    # delta whose training forward takes the factored path (F.linear of the weight, then relu)
    "delta_factored": Case(
        "scaffold_targets.ReluLinear", ("in_features=6", "out_features=5"), _relu_linear, lambda: torch.randn(4, 6)
    ),
    # experts whose training forward takes the factored path (bmm of the dispatched tokens with the bank)
    "experts": Case(
        "benchmarks.targets.StackedExperts",
        ("num_experts=3", "in_features=6", "out_features=5"),
        _experts,
        lambda: torch.randn(3, 4, 6),
        split_dim=1,
        example_input="torch.randn(3, 2, 6)",
    ),
}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def load_layer_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(layer_module) -> LoraConfig:
    return layer_module.register(LoraConfig(target_modules=["layer"], r=4, lora_alpha=8, init_lora_weights=False))


def make_base(case: Case) -> Holder:
    torch.manual_seed(0)
    return Holder(case.build())


def make_model(case: Case, layer_module) -> PeftModel:
    """The same model on every rank and in the single-process reference: every draw is seeded."""
    base = make_base(case)
    torch.manual_seed(1)
    return get_peft_model(base, make_config(layer_module))


def loss_of(output: torch.Tensor) -> torch.Tensor:
    # A mean over equal shares: the average of the ranks' gradients is the global batch's gradient.
    return output.float().pow(2).mean()


def lora_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items() if "lora_" not in name}


def single_process_step(case: Case, layer_module) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """The reference: one SGD step on the whole batch; returns the model after it and the LoRA gradients."""
    model = make_model(case, layer_module)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    loss_of(model(global_batch(case))).backward()
    gradients = lora_gradients(model)
    optimizer.step()
    return model, gradients


def global_batch(case: Case) -> torch.Tensor:
    torch.manual_seed(2)
    return case.batch()


def local_batch(case: Case, rank: int) -> torch.Tensor:
    return global_batch(case).chunk(WORLD_SIZE, dim=case.split_dim)[rank]


def run_ddp(case: Case, layer_module, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(case, layer_module)
    before = base_state(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LEARNING_RATE)
    loss_of(ddp(local_batch(case, rank))).backward()
    gradients = lora_gradients(model)
    optimizer.step()
    after = base_state(model)
    return {"gradients": gradients, "base_unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def run_fsdp(case: Case, layer_module, rank: int, mixed_precision: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model(case, layer_module)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    options = {"mp_policy": policy} if policy else {}
    fully_shard(model.base_model.model.layer, **options)  # the LoRA layer, base module included, is one unit
    fully_shard(model, **options)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    loss = loss_of(model(local_batch(case, rank)))
    loss.backward()
    finite_gradients = all(
        torch.isfinite(p.grad.full_tensor()).all().item() for p in model.parameters() if p.grad is not None
    )
    optimizer.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"loss": loss.detach().float(), "finite_gradients": finite_gradients}
    if rank == 0:
        result["adapter"] = {k: v.clone() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}
    return result


def run_fsdp_with_base_module_as_own_unit(case: Case, layer_module, rank: int) -> dict:
    """The base module sharded on its own: factored layers call it, delta layers need its weight before that."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(case, layer_module)
    layer = model.base_model.model.layer
    for module in (layer.get_base_layer(), layer, model):
        fully_shard(module)
    try:
        loss = loss_of(model(local_batch(case, rank)))
        loss.backward()
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None, "loss": loss.detach()}


def worker(rank: int, case_name: str, layer_file: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        case, layer_module = CASES[case_name], load_layer_module(layer_file)
        results = {
            "ddp": run_ddp(case, layer_module, rank),
            "fsdp": run_fsdp(case, layer_module, rank, mixed_precision=False),
            "fsdp_bf16": run_fsdp(case, layer_module, rank, mixed_precision=True),
            "fsdp_base_unit": run_fsdp_with_base_module_as_own_unit(case, layer_module, rank),
        }
        if rank == 0:
            for engine, result in results.items():
                torch.save(result, Path(out) / f"{engine}.pt")
    finally:
        # A refused forward leaves FSDP state in reference cycles; freed after the group is gone (at exit), their
        # gloo work aborts the process about one run in ten. Free them while the group lives, and leave together.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    case_name, layer_file, port, out = sys.argv[1:]
    mp.spawn(worker, args=(case_name, layer_file, int(port), out), nprocs=WORLD_SIZE, join=True)
