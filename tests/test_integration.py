"""Generated layers inside the small real models their targets live in (transformers models from tiny configs,
torch's TransformerEncoderLayer): dispatch, one optimizer step on LoRA parameters only, save and load, and
merge_and_unload() giving the unmerged output."""

import importlib
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_real_layers import DBRX_EXPERTS, DBRX_FFN, DBRX_TOKENS, GPT2_MLP, LLAMA_MLP, MIXTRAL_EXPERTS, ROUTED_TOKENS
from torch import nn

from lora_scaffold.cli import main


@dataclass(frozen=True)
class Case:
    arguments: tuple[str, ...]  # of `new`
    target_module: str  # LoraConfig.target_modules entry
    model: str  # builds the model: an expression with transformers and torch in scope
    inputs: str


def quiet_config(name: str, **sizes):
    import transformers

    return getattr(transformers, name)(vocab_size=32, bos_token_id=0, eos_token_id=1, pad_token_id=0, **sizes)


CASES = {
    "llama_mlp": Case(
        ("transformers.models.llama.modeling_llama.LlamaMLP", "--init", LLAMA_MLP, "--weight", "down_proj.weight"),
        "mlp",
        "transformers.LlamaForCausalLM(config('LlamaConfig', hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))",
        "torch.randint(2, 32, (2, 5))",
    ),
    "gpt2_mlp": Case(
        ("transformers.models.gpt2.modeling_gpt2.GPT2MLP", "--init", GPT2_MLP, "--weight", "c_proj.weight"),
        "mlp",
        "transformers.GPT2LMHeadModel(config('GPT2Config', n_embd=16, n_layer=2, n_head=2, n_positions=16))",
        "torch.randint(2, 32, (2, 5))",
    ),
    "mixtral_experts": Case(
        ("transformers.models.mixtral.modeling_mixtral.MixtralExperts", "--init", MIXTRAL_EXPERTS)
        + ("--weight", "gate_up_proj", "--example-input", ROUTED_TOKENS),
        "experts",
        "transformers.MixtralForCausalLM(config('MixtralConfig', hidden_size=8, intermediate_size=16, "
        "num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, num_local_experts=3, "
        "num_experts_per_tok=2))",
        "torch.randint(2, 32, (2, 5))",
    ),
    "dbrx_experts": Case(
        ("transformers.models.dbrx.modeling_dbrx.DbrxExperts", "--init", DBRX_EXPERTS)
        + ("--weight", "mlp.w1", "--example-input", DBRX_TOKENS),
        "experts",
        f"transformers.DbrxForCausalLM(config('DbrxConfig', d_model=16, n_heads=2, n_layers=2, max_seq_len=32, "
        f"ffn_config={DBRX_FFN}, attn_config={{'kv_n_heads': 2, 'rope_theta': 10000.0, 'clip_qkv': 8.0}}))",
        "torch.randint(2, 32, (2, 5))",
    ),
    "mha_in_proj": Case(
        ("torch.nn.MultiheadAttention", "--weight", "in_proj_weight", "--name", "mha_in"),
        "self_attn",
        "torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), 2)",
        "torch.randn(2, 5, 16)",
    ),
}


def build(expression: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return eval(expression, {"torch": torch, "transformers": transformers, "config": quiet_config})  # noqa: S307


def output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(inputs)
    return result if isinstance(result, torch.Tensor) else result.logits


@pytest.fixture(scope="module", params=sorted(CASES))
def layer(request, tmp_path_factory):
    """The case and its generated layer module, imported."""
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    assert main(["new", *case.arguments, "-o", str(folder)]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        (layer_file,) = folder.glob("lora_*.py")
        module = importlib.import_module(layer_file.stem)
    return case, module


def peft_model(case: Case, module) -> PeftModel:
    config = module.register(LoraConfig(target_modules=[case.target_module], r=4, init_lora_weights=False))
    return get_peft_model(build(case.model), config)


def inputs_of(case: Case) -> torch.Tensor:
    torch.manual_seed(1)
    return eval(case.inputs, {"torch": torch})  # noqa: S307


def test_every_target_in_the_model_is_dispatched_to_the_generated_layer(layer):
    case, module = layer
    model = peft_model(case, module)
    layer_class = next(
        value for name, value in vars(module).items() if name.startswith("Lora") and name != "LoraConfig"
    )
    wrapped = [m for name, m in model.named_modules() if name.endswith(f".{case.target_module}")]
    assert len(wrapped) == 2 and all(isinstance(m, layer_class) for m in wrapped)


def test_one_step_trains_lora_only_and_saves_and_loads(layer, tmp_path):
    case, module = layer
    model = peft_model(case, module)
    inputs = inputs_of(case)
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    model.train()
    result = model(inputs)
    (result if isinstance(result, torch.Tensor) else result.logits).pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, before[name]) for name, p in trainable.items())
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)
    model.eval()
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    config = module.register(LoraConfig.from_pretrained(tmp_path))
    loaded = PeftModel.from_pretrained(build(case.model), tmp_path, config=config).eval()
    torch.testing.assert_close(output(loaded, inputs), expected)


def test_merge_and_unload_gives_the_unmerged_output(layer):
    case, module = layer
    model = peft_model(case, module).eval()
    inputs = inputs_of(case)
    unmerged = output(model, inputs)
    assert not torch.allclose(unmerged, output(build(case.model).eval(), inputs))
    merged = model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(output(merged, inputs), unmerged, rtol=1e-4, atol=1e-5)
