"""The model zoo: transformers architectures from tiny configs (nothing is downloaded), each taken through
`scan --generate`, its generated suites and `audit`. `python tests/model_zoo.py [NAME ...]` prints the README's
table; tests/test_model_zoo.py asserts it, one architecture a test.

`python tests/model_zoo.py --sweep [TYPE ...]` takes the same path for the architectures no one chose: every model
type of the installed transformers outside the zoo with an AutoModel whose `tiny` config builds under
SWEEP_PARAMETERS parameters (205 types in 17 minutes on two cores); its failures are where to look next."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from suite_process import run_pytest

from lora_scaffold.cli import main


HERE = Path(__file__).resolve().parent
# Sizes every decoder below shares: hidden 16, one layer, two heads, a vocabulary of 64.
DECODER = "hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2"
TEXT = f"{DECODER}, vocab_size=64"
MOE = "num_experts_per_tok=2"


# What `tiny` sets, where a config class has the attribute: hidden 16, one layer, 4 experts, top-2, a vocabulary of 64.
SMALL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "shared_expert_intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    # Linear attention (Kimi-Linear's, GLM-5-Next's): its defaults, 32 or 64 heads of 128, make a forward take a second
    # where the rest of the model takes milliseconds.
    "linear_num_heads": 2,
    "linear_head_dim": 8,
}


EVERY_LAYER_SPARSE = {
    "num_dense_layers": 0,
    "num_dense_blocks": 0,
    "moe_layer_start_index": 0,
    "mlp_only_layers": [],
    "decoder_sparse_step": 1,
}


def tiny(model_type: str, auto_class: str = "AutoModelForCausalLM", **extra) -> str:
    """The expression of a model of that type from its config class's defaults, made small (`small_arguments`)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    return f"transformers.{auto_class}.from_config({_config_expression(config_class, extra)})"


def tiny_text(config_class: str, model_class: str, **extra) -> str:
    """The text model of a multimodal family (no auto class builds it from its text config), made small."""
    import transformers

    return f"transformers.{model_class}({_config_expression(getattr(transformers, config_class), extra)})"


def _config_expression(config_class, extra: dict) -> str:
    arguments = {**small_arguments(config_class()), **extra}
    listed = ", ".join(f"{name}={value!r}" for name, value in arguments.items())
    return f"transformers.{config_class.__name__}({listed})"


def small_arguments(defaults) -> dict:
    """SMALL where the config has the attribute, every MoE layer sparse, one layer of each layer type."""
    arguments = {name: value for name, value in SMALL.items() if _has(defaults, name)}
    # Every MoE layer sparse from the first, where the config says which are dense.
    arguments.update({name: value for name, value in EVERY_LAYER_SPARSE.items() if _has(defaults, name)})
    # One layer of each kind a hybrid has (a linear-attention-only model cannot build its attention mask).
    kinds = list(dict.fromkeys(getattr(defaults, "layer_types", None) or ()))
    if kinds:
        arguments.update(layer_types=kinds, num_hidden_layers=len(kinds))
    if getattr(defaults, "mlp_layer_types", None):
        # Each sparse kind the config has (DeepSeek-V4: hash-routed, then learned-routed), in turn.
        sparse = list(dict.fromkeys(kind for kind in defaults.mlp_layer_types if kind != "dense")) or ["sparse"]
        arguments["mlp_layer_types"] = [sparse[i % len(sparse)] for i in range(arguments.get("num_hidden_layers", 1))]
    if isinstance(getattr(defaults, "pad_token_id", None), int) and defaults.pad_token_id >= SMALL["vocab_size"]:
        arguments["pad_token_id"] = 0
    return arguments


def fitted_mrope(config_class) -> dict:
    """rope_parameters whose multimodal sections fit the small head (the modeling code of Qwen2-VL's text model and
    its kin defaults them for a head of 128, and fails on a small one), for a config whose modeling reads them; {}
    for others."""
    defaults = config_class()
    rope = getattr(defaults, "rope_parameters", None)
    if not isinstance(rope, dict) or "mrope_section" in rope or not _reads_mrope_section(config_class):
        return {}
    half = int(SMALL["head_dim"] * rope.get("partial_rotary_factor", 1)) // 2
    return {"rope_parameters": {**rope, "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}}


def _reads_mrope_section(config_class) -> bool:
    import importlib

    try:
        modeling = importlib.import_module(config_class.__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return False
    return "mrope_section" in inspect.getsource(modeling)


def _has(config, name: str) -> bool:
    """Whether the config takes `name`; Gemma 4's refuses to read a per-layer attribute globally, but takes it."""
    try:
        return hasattr(config, name)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return True


def causal(config: str) -> str:
    return f"transformers.AutoModelForCausalLM.from_config(transformers.{config})"


def auto(config: str, auto_class: str = "AutoModel") -> str:
    return f"transformers.{auto_class}.from_config(transformers.{config})"


ZOO: dict[str, str] = {
    # Every MoE family of transformers 5 the issue names, and more.
    "mixtral": causal(f"MixtralConfig({TEXT}, num_local_experts=4)"),
    "qwen2_moe": causal(
        f"Qwen2MoeConfig({TEXT}, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_experts=4, {MOE})"
    ),
    "qwen3_moe": causal(f"Qwen3MoeConfig({TEXT}, moe_intermediate_size=8, num_experts=4, {MOE}, head_dim=8)"),
    "qwen3_next": causal(
        f"Qwen3NextConfig({TEXT}, moe_intermediate_size=8, shared_expert_intermediate_size=16, num_experts=4, {MOE}, "
        "head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, "
        "layer_types=['linear_attention'])"
    ),
    "olmoe": causal(f"OlmoeConfig({TEXT}, num_experts=4, {MOE})"),
    "deepseek_v2": causal(
        f"DeepseekV2Config({TEXT}, moe_intermediate_size=8, n_routed_experts=4, {MOE}, n_shared_experts=1, "
        "first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, "
        "v_head_dim=8, n_group=1, topk_group=1)"
    ),
    "deepseek_v3": causal(
        f"DeepseekV3Config({TEXT}, moe_intermediate_size=8, n_routed_experts=4, {MOE}, n_shared_experts=1, "
        "first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, "
        "v_head_dim=8, n_group=1, topk_group=1)"
    ),
    "granitemoe": causal(f"GraniteMoeConfig({TEXT}, num_local_experts=4, {MOE})"),
    "phimoe": causal(f"PhimoeConfig({TEXT}, num_local_experts=4, {MOE})"),
    "jamba": causal(
        f"JambaConfig({TEXT}, num_experts=4, {MOE}, expert_layer_period=1, expert_layer_offset=0, "
        "attn_layer_period=1, attn_layer_offset=0, mamba_d_state=4, mamba_dt_rank=4, mamba_d_conv=2, mamba_expand=2, "
        "use_mamba_kernels=False)"
    ),
    "gpt_oss": causal(f"GptOssConfig({TEXT}, num_local_experts=4, {MOE}, head_dim=8, layer_types=['full_attention'])"),
    **{
        name: tiny(name)
        for name in ("aria_text", "cohere2_moe", "exaone_moe", "glm4_moe", "granitemoeshared", "hunyuan_v1_moe")
    },
    **{name: tiny(name) for name in ("jetmoe", "llama4_text", "minimax")},
    **{
        name: tiny(name)
        for name in (
            *("afmoe", "axk2", "bailing_hybrid", "beam", "deepseek_v32", "ergo", "ernie4_5_moe"),
            *("flint", "glm4_moe_lite", "glm_moe_dsa", "granitemoe_swa", "hy_v3", "hy_v4", "inkling_text"),
            *("inkling2_text", "inkling2_loop_text", "kimi_linear", "kolibri1", "laguna", "lara_mini", "mellum"),
            *("minicpm5_moe", "minimax_m2", "minimax_m3_vl_text", "nemotron_h", "qwen3_5_moe_text", "solar_open"),
        )
    },
    **{
        name: tiny(name, "AutoModel")
        for name in (
            "mistral4",
            "mistral_large4_text",
            "muse_spark_text",
            "openai_privacy_filter",
            "qwen3_vl_moe_text",
        )
    },
    "axk1": tiny("axk1", qk_head_dim=8, head_dim=4),  # its qk_head_dim is not derived from the rope and nope dims
    # One decoder layer: LongCat counts two attention sublayers a layer (num_hidden_layers = 2 * num_layers).
    "longcat_flash": tiny(
        "longcat_flash", num_hidden_layers=2, expert_ffn_hidden_size=8, zero_expert_num=2, qk_head_dim=8, head_dim=4
    ),
    "dbrx": causal(
        "DbrxConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=64, vocab_size=64, attn_config={'kv_n_heads': 1, "
        "'rope_theta': 10000.0, 'clip_qkv': 8.0}, ffn_config={'ffn_hidden_size': 32, 'hidden_size': 16, "
        "'moe_num_experts': 4, 'moe_top_k': 2})"
    ),
    # Compressing 2 and 4 tokens into one, so that 8 tokens reach both compressors.
    "deepseek_v4": tiny(
        "deepseek_v4", compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}
    ),
    "dots1": tiny("dots1", n_shared_experts=1),
    "glm5_next_text": tiny("glm5_next_text", "AutoModel", qk_rope_head_dim=0),
    "gemma4_text": tiny(
        "gemma4_text",
        enable_moe_block=True,
        top_k_experts=2,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=4,
        vocab_size_per_layer_input=64,
    ),
    "glm4v_moe_text": tiny(
        "glm4v_moe_text",
        "AutoModel",
        rope_parameters={
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "rope_type": "default",
            "mrope_section": [1, 1, 0],
        },
    ),
    "granitemoehybrid": tiny(
        "granitemoehybrid",
        mamba_n_heads=4,
        mamba_d_state=4,
        mamba_n_groups=1,
        mamba_chunk_size=4,
        layer_types=["linear_attention", "attention"],
        num_hidden_layers=2,
    ),
    "kolibri1_1": tiny("kolibri1_1", head_dim=16, index_num_heads=1),
    # Sliding-window layers have twice the key-value heads: four query heads keep whole groups in both kinds.
    "mimo_v2_flash": tiny("mimo_v2_flash", num_attention_heads=4, v_head_dim=8),
    "nllb_moe": auto(
        "NllbMoeConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, "
        "decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_experts=4, expert_capacity=8, "
        "encoder_sparse_step=1, decoder_sparse_step=1, vocab_size=64, max_position_embeddings=64)"
    ),
    "qwen4_exp_text": tiny(
        "qwen4_exp_text",
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=8,
        indexer_compress_ratio=2,
    ),
    "zaya": tiny("zaya", num_experts_per_tok=1),
    "switch_transformers": auto(
        "SwitchTransformersConfig(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, "
        "num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, vocab_size=64, expert_capacity=8)"
    ),
    "flex_olmo": tiny("flex_olmo", pad_token_id=0, eos_token_id=1),
    "lfm2_moe": tiny("lfm2_moe", layer_types=["full_attention"], num_dense_layers=0),
    # The text models of multimodal families: no auto class builds them from a text config.
    "dots3_note": tiny_text(
        "Dots3NoteTextConfig",
        "Dots3NoteTextModel",
        per_layer_config={},
        index_head_dim=8,
        index_n_heads=2,
        shared_experts_intermediate_size=16,
    ),
    "step3p7": tiny_text(
        "Step3p7TextConfig", "Step3p7TextModel", sliding_window=4, share_expert_dim=16, num_sliding_attention_heads=2
    ),
    "diffusion_gemma": tiny_text(
        "DiffusionGemmaTextConfig", "DiffusionGemmaEncoderTextModel", per_layer_config={}, top_k_experts=2
    ),
    # Text and vision experts side by side; token ids alone reach only the text ones.
    "ernie4_5_vl_moe": tiny_text(
        "Ernie4_5_VLMoeTextConfig",
        "Ernie4_5_VLMoeTextModel",
        moe_intermediate_size=[8, 8],
        moe_num_experts=4,
        moe_k=2,
        moe_num_shared_experts=1,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [1, 1, 2]},
    ),
    "hy_v4_vl": tiny_text(
        "HYV4VLTextConfig",
        "HYV4VLTextModel",
        index_head_dim=8,
        index_n_heads=2,
        indexer_types=["full"],
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [1, 1, 0]},
    ),
    "qwen3_omni_moe": tiny_text("Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel"),
    # The talker takes embeddings from the thinker: it has no token embedding of its own.
    "qwen3_omni_moe_talker": tiny_text(
        "Qwen3OmniMoeTalkerTextConfig", "Qwen3OmniMoeTalkerModel", shared_expert_intermediate_size=16
    ),
    "deepseek_ocr2": tiny_text(
        "DeepseekOcr2TextConfig", "DeepseekOcr2TextModel", mlp_layer_types=["sparse"], n_shared_experts=1
    ),
    "unlimited_ocr": tiny_text("UnlimitedOcrTextConfig", "UnlimitedOcrTextModel", n_shared_experts=1),
    # State-space and recurrent models, an embedding with an offset.
    "mamba": causal(
        "MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=64, expand=2, conv_kernel=3, "
        "time_step_rank=4)"
    ),
    "opt": causal(
        "OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, "
        "max_position_embeddings=32, word_embed_proj_dim=16)"
    ),
    "mamba2": causal(
        "Mamba2Config(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=64, expand=2, conv_kernel=3, "
        "num_heads=4, head_dim=8, n_groups=1, chunk_size=4)"
    ),
    "recurrent_gemma": causal(
        "RecurrentGemmaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "num_key_value_heads=1, vocab_size=64, lru_width=16, attention_window_size=4, conv1d_width=2, "
        "block_types=['recurrent'])"
    ),
    # Dense decoders: what PEFT covers alone (the scaled embeddings of the Gemmas get a layer of their own).
    **{
        name: tiny(name)
        for name in (
            *("apertus", "arcee", "bitnet", "bloom", "cohere", "cohere2", "diffllama", "ernie4_5", "exaone4"),
            *("gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "granite", "helium", "hunyuan_v1_dense", "lfm2"),
            *("llama", "mistral", "mpt", "nemotron", "olmo", "olmo2", "phi", "qwen2", "qwen3", "seed_oss"),
            *("stablelm", "starcoder2"),
        )
    },
    # Encoders: text, audio, vision.
    "bert": auto(
        "BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64, "
        "max_position_embeddings=32)"
    ),
    "clip_text": auto(
        "CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "vocab_size=64, max_position_embeddings=16)"
    ),
    "vit": auto(
        "ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=32, num_labels=3)",
        "AutoModelForImageClassification",
    ),
    "dinov2": auto(
        "Dinov2Config(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, "
        "mlp_ratio=2)"
    ),
    "wav2vec2": auto(
        "Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, "
        "conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, "
        "num_conv_pos_embedding_groups=2, vocab_size=32)"
    ),
    "swin": auto(
        "SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, "
        "num_labels=3)",
        "AutoModelForImageClassification",
    ),
    # Vision towers fed flattened patches and their grid (`grid_thw`); Kimi-K2.5's position embedding is interpolated
    # to the grid, and gets a layer of its own.
    "qwen2_5_vl_vision": auto(
        "Qwen2_5_VLVisionConfig(hidden_size=16, intermediate_size=32, depth=1, num_heads=2, out_hidden_size=16)"
    ),
    "kimi_k25_vision": auto(
        "Kimi_K25VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)"
    ),
}


# DeepSeek's sparse attention (DSA): the indexer's scores only choose which tokens attention reads (top-k), so no
# gradient reaches its projections, and on 8 tokens, fewer than it keeps, every token is chosen whatever the scores.
INDEXER_DEAD = "PEFT's lora.Linear on the DSA indexer: its scores only pick tokens by top-k (no gradient), all 8 here"


def _indexer(prefix: str, *names: str) -> dict[str, str]:
    """The indexer's projections under `prefix`'s attention (names relative to it, or the usual three)."""
    names = names or tuple(f"indexer.{name}" for name in ("wq_b", "wk", "weights_proj"))
    return {f"{prefix}.self_attn.{name}": INDEXER_DEAD for name in names}


# What `audit` finds wrong that is not a generated layer's doing: module -> why. The zoo test requires exactly these.
KNOWN_FAILURES = {
    **{name: _indexer("model.layers.0") for name in ("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4")},
    **{name: _indexer("layers.0") for name in ("mistral_large4_text", "dots3_note", "hy_v4_vl")},
    "glm5_next_text": _indexer("layers.1"),
    "deepseek_v4": {
        "model.layers.0.mlp.gate": "DeepseekV4HashRouter's token-to-expert table (tid2eid) is all zeros at init: every "
        "token takes expert 0 twice, at weight 1/2 whatever the gate scores",
        **_indexer("model.layers.1", *(f"compressor.indexer.{name}" for name in ("kv_proj", "gate_proj", "q_b_proj"))),
        **_indexer("model.layers.1", "compressor.indexer.scorer.weights_proj"),
    },
    "qwen4_exp_text": _indexer("model.layers.1", "indexer.index_qk_proj"),
    "zaya": {
        f"model.layers.0.self_attn.qkv_proj.{name}": "ZayaQKNorm's key scale `temp` starts at zero: attention is "
        "uniform whatever the queries and keys until it is trained"
        for name in ("q_proj", "k_proj")
    },
    "mamba": {
        "backbone.layers.0.mixer.dt_proj": "PEFT's lora.Linear there is dead: MambaMixer's forward multiplies by "
        "dt_proj.weight itself (`self.dt_proj.weight @ time_step`); the mixer's own layer adapting it instead would be "
        "below float32's resolution at init (a change of the weight's size moves the mixer's output by 1.5e-05 of its "
        "scale)",
    },
    "phimoe": {
        "model.layers.0.mlp.router": "no gradient from the model's output: PhiMoE's sparsemixer passes none to the "
        "router logits (the router trains through the auxiliary loss)",
    },
}


@dataclass(frozen=True)
class ZooResult:
    name: str
    classes: int  # classes of the model that hold weights
    generated: tuple[str, ...]  # `class: strategy` of each generated layer
    not_generated: tuple[str, ...]  # `class: why` for each class with a command that did not become a layer
    passed: int
    failed: int
    audit_passed: bool
    dead: tuple[str, ...]
    failing: tuple[str, ...]  # modules failing any audit check (live, gradients, merge)
    peft_share: float
    with_generated_share: float


SWEEP_PARAMETERS = 2_000_000


def sweep(model_types: list[str]) -> dict[str, str]:
    """`type -> tiny(type, "AutoModel")` for the model types given, or else every one outside the zoo, that builds
    (counted on the meta device) under SWEEP_PARAMETERS parameters."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    found = {}
    for model_type in model_types or sorted(set(MODEL_MAPPING_NAMES) - set(ZOO)):
        try:
            from transformers import CONFIG_MAPPING

            expression = tiny(model_type, "AutoModel", **fitted_mrope(CONFIG_MAPPING[model_type]))
            with torch.device("meta"):
                model = eval(expression, {"transformers": transformers})  # noqa: S307 - our own expression
        except Exception as error:  # noqa: BLE001 - a config `tiny` cannot make small is skipped, and said
            print(f"{model_type}: not built: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
            continue
        if sum(parameter.numel() for parameter in model.parameters()) <= SWEEP_PARAMETERS:
            found[model_type] = expression
    return found


def run(name: str, root: Path, model: str | None = None) -> ZooResult:
    # The folder is a Python package: a model type like `xlm-roberta` gets `xlm_roberta`.
    model, out = model or ZOO[name], root / re.sub(r"\W", "_", name)
    generate = _json(["scan", model, "--generate", "-o", str(out)])
    layers = generate["layers"]
    passed, failed = _suites(out, root / f"{name}.xml") if any(layer["layer"] for layer in layers) else (0, 0)
    audit = _json(["audit", model] + (["--layers", str(out)] if any(layer["layer"] for layer in layers) else []))
    coverage, total = audit["coverage"], max(audit["coverage"]["weight_elements"], 1)
    return ZooResult(
        name=name,
        classes=generate["classes"],
        generated=tuple(f"{_layer_cell(layer, layers)}: {layer['strategy']}" for layer in layers if layer["layer"]),
        not_generated=tuple(f"{_short(layer['class'])}: {layer['error']}" for layer in layers if not layer["layer"]),
        passed=passed,
        failed=failed,
        audit_passed=audit["passed"],
        dead=tuple(m["name"] for m in audit["modules"] if not m["live"]),
        failing=tuple(m["name"] for m in audit["modules"] if not m["passed"]),
        peft_share=coverage["peft"] / total,
        with_generated_share=(coverage["peft"] + coverage["generated"]) / total,
    )


def _json(arguments: list[str]) -> dict:
    """The command's --json output, run in this process (each model costs seconds, a fresh interpreter more)."""
    output, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
        code = main([*arguments, "--json"])
    if not output.getvalue().strip():
        raise AssertionError(f"{arguments[0]}: exit {code}: {errors.getvalue()[-2000:]}")
    data = json.loads(output.getvalue())
    if data.get("error"):
        raise AssertionError(f"{arguments[0]}: {data['error']}")
    return data


def _suites(folder: Path, junit: Path) -> tuple[int, int]:
    run_pytest(["-q", "-p", "no:cacheprovider", f"--junitxml={junit}", str(folder)], folder.parent, dict(os.environ))
    cases = list(ElementTree.parse(junit).iter("testcase"))
    failed = sum(1 for case in cases if case.find("failure") is not None or case.find("error") is not None)
    return len(cases) - failed, failed


def _layer_cell(layer: dict, layers: list[dict]) -> str:
    """The class, and the weight where the class has a layer for each of several (stacked on its modules)."""
    several = sum(other["class"] == layer["class"] for other in layers) > 1
    return _short(layer["class"]) + (f".{layer['weight']}" if several else "")


def _short(qualified: str) -> str:
    return qualified.split(" ")[0].rpartition(".")[2] + (" (parametrized)" if "parametrized" in qualified else "")


def table_row(result: ZooResult) -> str:
    generated = "<br>".join(result.generated) or "-"
    missing = "<br>".join(result.not_generated)
    return (
        f"| {result.name} | {result.classes} | {generated}{'<br>not: ' + missing if missing else ''} | "
        f"{result.passed}/{result.passed + result.failed} | {_audit_cell(result)} | "
        f"{result.peft_share:.1%} | {result.with_generated_share:.1%} |"
    )


def _audit_cell(result: ZooResult) -> str:
    if not result.failing:
        return "all live, trained, merged"
    return "<br>".join(f"{name}: {KNOWN_FAILURES.get(result.name, {}).get(name, 'FAILS')}" for name in result.failing)


if __name__ == "__main__":
    names = [name for name in sys.argv[1:] if name != "--sweep"]
    models = sweep(names) if "--sweep" in sys.argv else {name: ZOO[name] for name in names or ZOO}
    with tempfile.TemporaryDirectory() as folder:
        print("| model | classes | layers generated: strategy | suites | audit | PEFT alone | with generated |")
        print("|---|---|---|---|---|---|---|")
        for name, model in models.items():
            try:
                print(table_row(run(name, Path(folder), model)), flush=True)
            except AssertionError as error:  # the rest of the table still comes
                print(f"| {name} | FAILED: {str(error)[:300]} |", flush=True)
            except Exception as error:  # noqa: BLE001 - a crash of the tool is what a sweep is for: said, and on
                print(f"| {name} | CRASHED: {type(error).__name__}: {str(error)[:300]} |", flush=True)
