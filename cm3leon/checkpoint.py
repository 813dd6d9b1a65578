"""Checkpoints: our safetensors format (config as JSON metadata) and import of Hugging Face Chameleon.

Our format: one ``.safetensors`` file whose metadata holds ``{"format": "cm3leon", "config": <json>,
"checksums": ...}`` (see :mod:`cm3leon.integrity`); tensor names are those of
:class:`cm3leon.model.CM3Leon`'s ``state_dict``, all in one floating dtype (float32, bfloat16 or float16).

Loading validates before it allocates: the config, then the file's tensor index (names, shapes, dtypes)
against a meta-device model, then reads and checksums each tensor. Damaged or inconsistent files raise
:class:`cm3leon.integrity.CheckpointError` (a ``ValueError``) naming the file and the problem.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .config import CM3LeonConfig
from .integrity import CheckpointError, Index, TensorFile, check_index, parse_json, save_tensor_file
from .model import CM3Leon

FORMAT = "cm3leon"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def save(model: CM3Leon, path: str | os.PathLike) -> None:
    """Writes the model's weights and config to ``path`` (a ``.safetensors`` file), with checksums."""
    save_tensor_file(path, model.state_dict(), kind=FORMAT, metadata={"config": model.config.to_json()})


def load(path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
         verify: bool = True) -> CM3Leon:
    """Loads a checkpoint written by :func:`save`.

    The model keeps the file's dtype unless ``dtype`` asks for a cast. ``verify=False`` skips the checksums
    (faster for large files; structural checks still run).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a readable cm3leon checkpoint, its config is invalid, its tensors
            do not match the config (names, shapes, dtypes), or a checksum fails.
    """
    _check_dtype(dtype)
    with TensorFile(path, kind=FORMAT, verify=verify, what="cm3leon checkpoint") as f:
        data = f.json_entry("config")
        config = _config(lambda: CM3LeonConfig.from_json(json.dumps(data)), f.error)
        return _build(config, f.index(), f.tensor, f.error, device=device, dtype=dtype)


def _check_dtype(dtype: object) -> None:
    """``dtype=`` is None or a weight dtype; checked before the file is read (``Module.to`` would otherwise
    fail late with a RuntimeError about device strings for e.g. ``"float32"``)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__} {dtype!r}")
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(str(d) for d in WEIGHT_DTYPES)}, got {dtype}")


def _config(make: Callable[[], CM3LeonConfig], error: Callable[[str], CheckpointError]) -> CM3LeonConfig:
    try:
        return make()
    except (TypeError, ValueError, KeyError) as err:  # unknown fields, wrong types, out-of-range values
        raise error(f"invalid model config: {err}") from None


def _build(config: CM3LeonConfig, index: Index, read: Callable[[str], torch.Tensor],
           error: Callable[[str], CheckpointError], *, device, dtype) -> CM3Leon:
    # Every layer holds tensors, so a config asking for more layers than the file has tensors is a lie; the
    # bound keeps even the meta-device model below (one module per layer) proportional to the file.
    if config.n_layers > len(index):
        raise error(f"config has n_layers={config.n_layers} but the file holds only {len(index)} tensors")
    with torch.device("meta"):
        model = CM3Leon(config)
    file_dtype = check_index(index, model.state_dict(), error, float_dtypes=WEIGHT_DTYPES)
    model = model.to(file_dtype).to_empty(device=device)  # sizes now match the file's: allocation is bounded
    model.load_state_dict({name: read(name) for name in index}, strict=True)
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
    model and are skipped. Foreign files carry no checksums; everything else is validated as in :func:`load`
    (errors: :class:`CheckpointError`)."""
    _check_dtype(dtype)
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: load_chameleon expects a Hugging Face model directory")
    config_error = lambda message: CheckpointError(f"{config_file}: {message}")  # noqa: E731
    hf = parse_json(config_file.read_text(encoding="utf-8", errors="replace"), config_error, "config.json")
    if not isinstance(hf, dict):
        raise config_error("must hold a JSON object")
    config = _config(lambda: chameleon_config(hf), config_error)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    opened: list[TensorFile] = []
    try:
        index: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        where: dict[str, tuple[TensorFile, str]] = {}
        for file in files:
            f = TensorFile(file, kind=None, verify=False)  # foreign files: no format tag, no checksums
            opened.append(f)
            for name, entry in f.index().items():
                ours = _hf_to_ours(name)
                if ours is None:
                    if not name.startswith("model.vqmodel."):
                        raise f.error(f"unexpected tensor {name!r} in a Chameleon checkpoint")
                elif ours in index:
                    raise f.error(f"tensor {name!r} also appears in {where[ours][0].path}")
                elif not (config.tie_embeddings and ours == "lm_head.weight"):
                    index[ours], where[ours] = entry, (f, name)
        return _build(config, index, lambda ours: where[ours][0].tensor(where[ours][1]),
                      lambda message: CheckpointError(f"{root}: {message}"), device=device, dtype=dtype)
    finally:
        for f in opened:
            f.close()
