"""Checkpoints: our safetensors format (config as JSON metadata) and import of Hugging Face Chameleon.

Our format: one ``.safetensors`` file whose metadata holds ``{"format": "cm3leon", "config": <json>}``; tensor
names are those of :class:`cm3leon.model.CM3Leon`'s ``state_dict``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import CM3LeonConfig
from .model import CM3Leon

FORMAT = "cm3leon"


def save(model: CM3Leon, path: str | os.PathLike) -> None:
    """Writes the model's weights and config to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": model.config.to_json()})


def load(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
         ) -> CM3Leon:
    """Loads a checkpoint written by :func:`save`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT or "config" not in metadata:
            raise ValueError(f"{path} is not a cm3leon checkpoint (metadata format={metadata.get('format')!r}); "
                             "for Hugging Face Chameleon directories use cm3leon.load_chameleon")
        config = CM3LeonConfig.from_json(metadata["config"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _build(config, tensors, device=device, dtype=dtype, source=str(path))


def _build(config: CM3LeonConfig, tensors: dict[str, torch.Tensor], *, device, dtype, source: str) -> CM3Leon:
    with torch.device("meta"):
        model = CM3Leon(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the config: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
                             f"{tuple(expected[name].shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict(tensors, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model


# ---- Hugging Face Chameleon ------------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.q_norm.bias": "attn.q_norm.bias",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "self_attn.k_norm.bias": "attn.k_norm.bias",
    "mlp.gate_proj.weight": "ffn.gate.weight",
    "mlp.up_proj.weight": "ffn.up.weight",
    "mlp.down_proj.weight": "ffn.down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight",
                 "lm_head.weight": "lm_head.weight"}


def chameleon_config(hf: dict) -> CM3LeonConfig:
    """Maps a Hugging Face ``ChameleonConfig`` (as a dict from config.json) to ours."""
    if hf.get("model_type") != "chameleon":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, expected 'chameleon'")
    if hf.get("swin_norm"):
        raise ValueError("swin_norm=True Chameleon checkpoints (the 30B layout) are not supported yet")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("only the Chameleon layout without biases and with SiLU-gated FFNs is supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
    return CM3LeonConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
        norm="rmsnorm", norm_affine=True, norm_eps=hf.get("rms_norm_eps", 1e-5), positions="rope",
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)), activation="swiglu", qk_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        zero_init_output_proj=False)


def _hf_to_ours(name: str) -> str | None:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    if name.startswith("model.layers."):
        index, _, rest = name[len("model.layers."):].partition(".")
        if rest in _HF_LAYER_NAMES:
            return f"blocks.{index}.{_HF_LAYER_NAMES[rest]}"
    return None


def load_chameleon(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> CM3Leon:
    """Imports a Hugging Face Chameleon checkpoint directory (``config.json`` + ``*.safetensors``, sharded or
    not) into :class:`CM3Leon`. The image VQ-GAN weights (``model.vqmodel.*``) are not part of the language
    model and are skipped."""
    from safetensors import safe_open

    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: load_chameleon expects a Hugging Face model directory")
    config = chameleon_config(json.loads(config_file.read_text()))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                ours = _hf_to_ours(name)
                if ours is not None:
                    tensors[ours] = f.get_tensor(name)
                elif not name.startswith("model.vqmodel."):
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} in a Chameleon checkpoint")
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return _build(config, tensors, device=device, dtype=dtype, source=str(root))
