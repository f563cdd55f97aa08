"""Conversion to and from Hugging Face `transformers` Reformer (`ReformerModelWithLMHead`): config and state dict.

Both layouts compute the same function (two reversible streams, 2*D final LayerNorm, bias-free head),
so conversion is a renaming plus two reshapes (axial position weights carry singleton axes in HF):

    ours                                   HF
    tok_emb.weight [V,D]                   reformer.embeddings.word_embeddings.weight
    pos_emb.rows [a,d1] / .cols [b,d2]     reformer.embeddings.position_embeddings.weights.0 [a,1,d1] / .1 [1,b,d2]
    stack.blocks.i.f.norm.*                reformer.encoder.layers.i.attention.layer_norm.*
    stack.blocks.i.f.attn.<p>.weight       reformer.encoder.layers.i.attention.self_attention.<p>.weight
                                           (<p> = query_key, value for "lsh"; query, key, value for "local")
    stack.blocks.i.f.out.weight            reformer.encoder.layers.i.attention.output.dense.weight
    stack.blocks.i.g.norm.*                reformer.encoder.layers.i.feed_forward.layer_norm.*
    stack.blocks.i.g.dense.*               reformer.encoder.layers.i.feed_forward.dense.dense.*
    stack.blocks.i.g.out.*                 reformer.encoder.layers.i.feed_forward.output.dense.*
    head.norm.* [2D]                       reformer.encoder.layer_norm.*
    head.proj.weight [V,2D]                lm_head.decoder.weight
    (none)                                 lm_head.decoder.bias and lm_head.bias [V]: exported as zeros (our head
                                           has no bias). transformers 5.x adds decoder.bias in forward and keeps
                                           lm_head.bias as an unused parameter; 4.x tied the two. Both are written
                                           so that loading reports no missing key; import warns if either is nonzero.

LSH hashing is NOT portable: our rotations come from a per-layer seeded generator, HF draws them from
the global RNG (or `torch.manual_seed(hash_seed)`). Converted LSH layers therefore agree exactly only
where hashing does not matter (sequence length <= lsh chunk length: plain attention); beyond that both
compute LSH attention with different random buckets. Local layers and everything else are exact.

Neither direction needs `transformers`: configs are read and written as JSON (HF's defaults below).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from reformer_dist.checkpoint.writer import check_writable, write_weights_dir
from reformer_dist.model.config import ACTIVATIONS, DOCUMENT_SETTINGS, TRAINED_WITH, ReformerConfig
from reformer_dist.model.reformer import ReformerLM
from reformer_dist.ondisk import (
    CONFIG_NAME,
    HF_BIN_INDEX,
    HF_BIN_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    CorruptCheckpointError,
    load_weights,
)

HF_ARCH = "ReformerModelWithLMHead"
HF_ACTIVATIONS = (
    "relu",
    "gelu",
    "silu",
    "swish",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "tanh",
    "sigmoid",
    "mish",
    "quick_gelu",
    "linear",
    "relu6",
    "leaky_relu",
    "elu",
    "selu",
)  # subset of ACT2FN keys
# transformers' ReformerConfig defaults (identical in 4.x and 5.x), for config.json files that omit a field.
HF_DEFAULTS: dict[str, Any] = {
    "attention_head_size": 64,
    "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"],
    "axial_norm_std": 1.0,
    "axial_pos_embds": True,
    "axial_pos_shape": [64, 64],
    "axial_pos_embds_dim": [64, 192],
    "chunk_size_lm_head": 0,
    "chunk_size_feed_forward": 0,
    "feed_forward_size": 512,
    "hash_seed": None,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.05,
    "hidden_size": 256,
    "initializer_range": 0.02,
    "is_decoder": False,
    "layer_norm_eps": 1e-12,
    "local_num_chunks_before": 1,
    "local_num_chunks_after": 0,
    "local_attention_probs_dropout_prob": 0.05,
    "local_attn_chunk_length": 64,
    "lsh_attn_chunk_length": 64,
    "lsh_attention_probs_dropout_prob": 0.0,
    "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0,
    "max_position_embeddings": 4096,
    "num_attention_heads": 12,
    "num_buckets": None,
    "num_hashes": 1,
    "vocab_size": 320,
    "tie_word_embeddings": False,
}
# Our fields HF has no place for. They do not change the function (memory knobs, init, the reversible
# switch: our non-reversible stack computes the same thing); export keeps them under this key so that
# import-hf restores them; a foreign HF checkpoint gets our defaults.
EXTRA_KEY = "reformer_dist"
_NON_HF_FIELDS = ("reversible", "ff_chunk_len", "loss_chunk_len", "init_std", "attention_backend", "head_groups")


class UnsupportedConfigError(ValueError):
    """The config has no equivalent on the other side; the message names the field."""


# ---------------------------------------------------------------------------------------------- config
def to_hf_config(cfg: ReformerConfig) -> dict[str, Any]:
    """transformers ReformerConfig fields (as a config.json dict) for `cfg`; refuses what HF cannot express."""
    cfg.validate()

    def refuse(name: str, why: str) -> None:
        raise UnsupportedConfigError(
            f"ReformerConfig.{name} = {getattr(cfg, name)!r} cannot be exported to Hugging Face transformers: {why}"
        )

    for i, kind in enumerate(cfg.attn_layers):
        if kind not in ("lsh", "local"):
            refuse("attn_layers", f"layer {i} is {kind!r}; HF Reformer has only 'lsh' and 'local' layers")
    if not cfg.causal:
        refuse("causal", f"{HF_ARCH} requires is_decoder=True (a causal LM)")
    if cfg.same_bucket_only:
        refuse("same_bucket_only", "HF LSH attention does not mask keys of other buckets")
    if not cfg.allow_duplicate_attention:
        refuse("allow_duplicate_attention", "HF LSH attention has no duplicate-attention correction")
    if cfg.activation not in HF_ACTIVATIONS:
        refuse("activation", f"not an HF activation ({HF_ACTIVATIONS})")
    nb = cfg.n_buckets
    return {
        "model_type": "reformer",
        "architectures": [HF_ARCH],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "attention_head_size": cfg.d_head,
        "feed_forward_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "attn_layers": list(cfg.attn_layers),
        "num_hashes": cfg.n_hashes,
        "lsh_attn_chunk_length": cfg.chunk_len,
        "lsh_num_chunks_before": cfg.n_chunks_before,
        "lsh_num_chunks_after": cfg.n_chunks_after,
        # None: HF computes it from the length like we do; its limit uses max_position_embeddings, ours
        # max_seq_len = prod(axial_pos_shape), hence max_position_embeddings below.
        "num_buckets": list(nb) if isinstance(nb, list) else nb,
        "hash_seed": cfg.hash_seed,
        "local_attn_chunk_length": cfg.local_chunk,
        "local_num_chunks_before": cfg.local_n_chunks_before,
        "local_num_chunks_after": cfg.local_n_chunks_after,
        "is_decoder": True,
        "axial_pos_embds": True,
        "axial_pos_shape": list(cfg.axial_pos_shape),
        "axial_pos_embds_dim": list(cfg.axial_pos_dims),
        "axial_norm_std": cfg.axial_norm_std,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "lsh_attention_probs_dropout_prob": 0.0,  # we have no attention-probability dropout
        "local_attention_probs_dropout_prob": 0.0,
        "chunk_size_feed_forward": 0,  # HF needs L divisible by it; ours is a memory knob (kept in EXTRA_KEY)
        "chunk_size_lm_head": 0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "pad_token_id": 0,  # only fills HF's internal padding to a chunk multiple (masked)
        "eos_token_id": None,
        "bos_token_id": None,
        "use_cache": True,
        EXTRA_KEY: cfg.to_dict(),
    }


def from_hf_config(hf: dict[str, Any]) -> tuple[ReformerConfig, list[str]]:
    """(ReformerConfig, warnings) from a transformers Reformer config.json dict; refuses what we cannot express."""
    if hf.get("model_type", "reformer") != "reformer":
        raise UnsupportedConfigError(f"model_type = {hf.get('model_type')!r}: not a Reformer config")
    get = lambda k: hf.get(k, HF_DEFAULTS[k])  # noqa: E731
    notes: list[str] = []

    def refuse(name: str, why: str) -> None:
        raise UnsupportedConfigError(f"HF config {name} = {get(name)!r} cannot be imported: {why}")

    if not get("axial_pos_embds"):
        refuse("axial_pos_embds", "reformer_dist has only axial position embeddings")
    layers = list(get("attn_layers"))
    for i, kind in enumerate(layers):
        if kind not in ("lsh", "local"):
            refuse("attn_layers", f"layer {i} is {kind!r}")
    act = get("hidden_act")
    if act not in ACTIVATIONS:
        refuse("hidden_act", f"reformer_dist supports {ACTIVATIONS}")
    if get("lsh_attn_chunk_length") is None:
        refuse("lsh_attn_chunk_length", "an integer chunk length is needed")
    if hf.get("num_hidden_layers", len(layers)) != len(layers):
        refuse("num_hidden_layers", f"differs from len(attn_layers) = {len(layers)}")
    for name in ("lsh_attention_probs_dropout_prob", "local_attention_probs_dropout_prob"):
        if get(name):
            notes.append(
                f"{name} = {get(name)} dropped: reformer_dist has no attention-probability dropout "
                "(inference is unaffected; fine-tuning regularises less)"
            )
    seed = get("hash_seed")
    if seed is None:
        notes.append("hash_seed = None (HF: fresh random rotations per call); using hash_seed = 0")
        seed = 0
    shape, dims = [int(x) for x in get("axial_pos_shape")], [int(x) for x in get("axial_pos_embds_dim")]
    if get("num_buckets") is None and "lsh" in layers and get("max_position_embeddings") != math.prod(shape):
        notes.append(
            f"max_position_embeddings = {get('max_position_embeddings')} differs from prod(axial_pos_shape) "
            f"= {math.prod(shape)}: the automatic num_buckets factorisation threshold may differ"
        )
    nb = get("num_buckets")
    extra: dict[str, Any] = hf[EXTRA_KEY] if isinstance(hf.get(EXTRA_KEY), dict) else {}
    d = {
        "vocab_size": get("vocab_size"),
        "d_model": get("hidden_size"),
        "n_heads": get("num_attention_heads"),
        "d_head": get("attention_head_size"),
        "d_ff": get("feed_forward_size"),
        "n_layers": len(layers),
        "attn_layers": layers,
        "n_hashes": get("num_hashes"),
        "chunk_len": get("lsh_attn_chunk_length"),
        "n_chunks_before": get("lsh_num_chunks_before"),
        "n_chunks_after": get("lsh_num_chunks_after"),
        "n_buckets": [int(x) for x in nb] if isinstance(nb, (list, tuple)) else nb,
        "hash_seed": int(seed),
        "local_chunk_len": get("local_attn_chunk_length"),
        "local_n_chunks_before": get("local_num_chunks_before"),
        "local_n_chunks_after": get("local_num_chunks_after"),
        "causal": bool(get("is_decoder")),
        "dropout": float(get("hidden_dropout_prob")),
        "activation": act,
        "layer_norm_eps": float(get("layer_norm_eps")),
        "axial_pos_shape": shape,
        "axial_pos_dims": dims,
        "init_std": float(get("initializer_range")),
        "axial_norm_std": float(get("axial_norm_std")),
    }
    d.update({k: extra[k] for k in _NON_HF_FIELDS if k in extra})
    if "local_chunk_len" in extra and extra["local_chunk_len"] is None and d["local_chunk_len"] == d["chunk_len"]:
        d["local_chunk_len"] = None  # ours said "same as chunk_len": keep that (same function, lossless round trip)
    try:
        return ReformerConfig.from_dict(d, source="HF config"), notes
    except ValueError as e:
        raise UnsupportedConfigError(f"HF config cannot be imported: {e}") from None


# ---------------------------------------------------------------------------------------------- state dict
_LAYER_RULES = [  # (ours after "stack.blocks.{i}.", HF after "reformer.encoder.layers.{i}.", values of {p})
    ("f.norm.{p}", "attention.layer_norm.{p}", ("weight", "bias")),
    ("f.attn.{p}.weight", "attention.self_attention.{p}.weight", ("query_key", "query", "key", "value")),
    ("f.out.weight", "attention.output.dense.weight", ("",)),
    ("g.norm.{p}", "feed_forward.layer_norm.{p}", ("weight", "bias")),
    ("g.dense.{p}", "feed_forward.dense.dense.{p}", ("weight", "bias")),
    ("g.out.{p}", "feed_forward.output.dense.{p}", ("weight", "bias")),
]
_FIXED = {  # ours -> HF
    "tok_emb.weight": "reformer.embeddings.word_embeddings.weight",
    "pos_emb.rows": "reformer.embeddings.position_embeddings.weights.0",
    "pos_emb.cols": "reformer.embeddings.position_embeddings.weights.1",
    "head.norm.weight": "reformer.encoder.layer_norm.weight",
    "head.norm.bias": "reformer.encoder.layer_norm.bias",
    "head.proj.weight": "lm_head.decoder.weight",
}
_HF_BIAS_KEYS = ("lm_head.bias", "lm_head.decoder.bias")  # 4.x stored the tied bias under both names
# Constant mask values that transformers 4.x saved as persistent buffers; not weights.
_HF_BUFFER_RE = re.compile(
    r"reformer\.encoder\.layers\.\d+\.attention\.self_attention\.(self_)?mask_value_float(16|32)$"
)


def key_map(n_layers: int) -> dict[str, str]:
    """Every possible key of ours -> its HF name, for a model of n_layers layers."""
    out = dict(_FIXED)
    for i in range(n_layers):
        for ours, hf, values in _LAYER_RULES:
            for p in values:
                out[f"stack.blocks.{i}." + ours.format(p=p)] = f"reformer.encoder.layers.{i}." + hf.format(p=p)
    return out


def expected_shapes(cfg: ReformerConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes for cfg (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = ReformerLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_against(state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not match the config: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{what}: {k} has shape {tuple(state[k].shape)}, the config needs {shape}")


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ReformerConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF `ReformerModelWithLMHead` state dict (plus zero `lm_head.bias` / `lm_head.decoder.bias`)."""
    _check_against(state, expected_shapes(cfg), "reformer_dist state dict")
    names = key_map(cfg.n_layers)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "pos_emb.rows":
            v = v.unsqueeze(1)  # [a, d1] -> [a, 1, d1]
        elif k == "pos_emb.cols":
            v = v.unsqueeze(0)  # [b, d2] -> [1, b, d2]
        out[names[k]] = v
    for key in _HF_BIAS_KEYS:  # separate tensors: safetensors refuses shared storage
        out[key] = torch.zeros(cfg.vocab_size, dtype=state["head.proj.weight"].dtype)
    return out


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], cfg: ReformerConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF Reformer state dict -> (our state dict, warnings). Unknown keys are an error, not silently dropped."""
    names = {hf: ours for ours, hf in key_map(cfg.n_layers).items()}
    notes: list[str] = []
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in hf_state.items():
        if k in _HF_BIAS_KEYS:
            if torch.count_nonzero(v):
                notes.append(
                    f"{k} is nonzero (max |b| = {v.abs().max().item():.3g}) and is dropped: reformer_dist "
                    "has no LM-head bias, so its logits differ from transformers' by this bias "
                    "(lm_head.decoder.bias is added in forward; lm_head.bias only in transformers 4.x)"
                )
            continue
        if _HF_BUFFER_RE.fullmatch(k):
            continue
        ours = names.get(k)
        if ours is None:
            unknown.append(k)
            continue
        if ours == "pos_emb.rows":
            v = v.reshape(v.shape[0], v.shape[-1])
        elif ours == "pos_emb.cols":
            v = v.reshape(v.shape[-2], v.shape[-1])
        out[ours] = v
    if unknown:
        raise ValueError(
            f"HF state dict: keys with no reformer_dist equivalent: {unknown[:6]}"
            f"{' ...' if len(unknown) > 6 else ''} (only {HF_ARCH} / ReformerForMaskedLM layouts convert)"
        )
    _check_against(out, expected_shapes(cfg), "HF state dict")
    return out, notes


# ---------------------------------------------------------------------------------------------- folders
def _load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    if (hf_dir / WEIGHTS_NAME).is_file() or (hf_dir / INDEX_NAME).is_file():
        return load_weights(hf_dir)
    bins = [hf_dir / HF_BIN_NAME]
    if (hf_dir / HF_BIN_INDEX).is_file():
        index = json.loads((hf_dir / HF_BIN_INDEX).read_text())
        bins = [hf_dir / n for n in sorted(set(index["weight_map"].values()))]
    state: dict[str, torch.Tensor] = {}
    for b in bins:
        if not b.is_file():
            raise FileNotFoundError(f"{hf_dir}: no {WEIGHTS_NAME}, shard index or {b.name}")
        try:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
            raise CorruptCheckpointError(f"{b}: cannot be read ({type(e).__name__}: {e})") from None
    return state


def check_document_settings(trained: dict[str, bool], where: Path, accept: bool) -> list[str]:
    """UnsupportedConfigError (or with `accept`, warnings) for document settings HF Reformer cannot apply."""
    on = [k for k in DOCUMENT_SETTINGS if trained.get(k)]
    if not on:
        return []
    what = " and ".join(f"data.{k} = true" for k in on)
    why = (
        f"{where}: the model was trained with {what} ({TRAINED_WITH} in {CONFIG_NAME}): a token attended only to "
        f"its own document{' and positions restarted at each document' if 'reset_positions' in on else ''}. "
        f"Hugging Face transformers' Reformer has no such setting: the exported model attends across "
        f"documents"
    )
    if not accept:
        raise UnsupportedConfigError(
            f"{why}. Pass --accept-document-masking to export anyway (the setting is kept "
            f"in the export's config.json under {EXTRA_KEY!r}), or feed it one document "
            "per sequence"
        )
    return [f"{why}; exported anyway (--accept-document-masking), recorded under {EXTRA_KEY!r}.{TRAINED_WITH}"]


def export_hf(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    accept_document_masking: bool = False,
) -> tuple[Path, list[str]]:
    """Our weights folder (config.json + model.safetensors) -> a folder `transformers` loads with
    `ReformerModelWithLMHead.from_pretrained(out_dir)`. Weights keep their dtype. Returns (out_dir, warnings).

    A model trained with document masks or position resets (config.json `trained_with`) is refused unless
    `accept_document_masking`: HF Reformer cannot apply them."""
    src = Path(src_dir)
    check_writable(out_dir, overwrite, [src])
    if not (src / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{src / CONFIG_NAME}: missing; expected a weights folder ({CONFIG_NAME} + "
            f"{WEIGHTS_NAME}, from `reformer-ckpt consolidate` or save_pretrained)"
        )
    cfg = ReformerConfig.load(src / CONFIG_NAME)
    hf_cfg = to_hf_config(cfg)  # refuses before anything is read or written
    trained = ReformerConfig.trained_with(src / CONFIG_NAME)
    notes = check_document_settings(trained, src / CONFIG_NAME, accept_document_masking)
    if trained:
        hf_cfg[EXTRA_KEY] = {**hf_cfg[EXTRA_KEY], TRAINED_WITH: trained}
    state = to_hf_state_dict(load_weights(src), cfg)
    dtypes = {v.dtype for v in state.values()}
    hf_cfg["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    write_weights_dir(out_dir, state, hf_cfg, max_shard_size=max_shard_size, overwrite=overwrite, inputs=[src])
    return Path(out_dir), notes


def import_hf(
    hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, max_shard_size: str | int = "5GB"
) -> tuple[Path, list[str]]:
    """A transformers Reformer folder (config.json + safetensors or pytorch_model.bin) -> our weights folder.

    Returns (out_dir, warnings); warnings are also issued with `warnings.warn`.
    """
    src = Path(hf_dir)
    check_writable(out_dir, overwrite, [src])
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; expected a Hugging Face model folder")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg, notes = from_hf_config(hf_cfg)
    state, more = from_hf_state_dict(_load_hf_weights(src), cfg)
    notes += more
    extra: dict[str, Any] = hf_cfg[EXTRA_KEY] if isinstance(hf_cfg.get(EXTRA_KEY), dict) else {}
    trained = extra.get(TRAINED_WITH)  # kept by an export of ours: the imported folder records it again
    config = {**cfg.to_dict(), **({TRAINED_WITH: trained} if isinstance(trained, dict) else {})}
    for n in notes:
        warnings.warn(f"import-hf: {n}", stacklevel=2)
    write_weights_dir(
        out_dir,
        state,
        config,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        inputs=[src],
        metadata={"config": json.dumps(cfg.to_dict())},
    )
    return Path(out_dir), notes
