"""export-hf / import-hf against transformers' own Reformer forward (fp32, tolerance 1e-5).

Hashing is not portable between the implementations (our rotations come from a per-layer seeded
generator), so the configs keep every LSH layer hash-independent: lsh chunk_len >= L (plain attention
with LSH's masks). Local layers use chunks smaller than L, so chunking, the neighbour chunk and the
causal mask across chunks are compared for real. Lengths that are not a chunk multiple exercise both
sides' internal padding.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers  # a dev dependency (pyproject [dev]): the comparison needs transformers' own forward

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.checkpoint.hf_adapter import UnsupportedConfigError, from_hf_config, import_hf, to_hf_config
from reformer_dist.cli.ckpt import main

transformers.logging.set_verbosity_error()

ATOL = 1e-5
CONFIGS = {
    "all_lsh": dict(attn_layers=["lsh", "lsh"], chunk_len=64, n_hashes=2),
    "local_lsh_mix": dict(attn_layers=["local", "lsh", "local"], chunk_len=64, local_chunk_len=8, n_hashes=2),
}


def _config(**kw) -> ReformerConfig:
    base = dict(
        vocab_size=53,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_ff=48,
        axial_pos_shape=[8, 8],
        activation="gelu",
        layer_norm_eps=1e-6,
        init_std=0.3,
    )  # large weights: sharp attention, so mistakes show
    base.update(kw)
    return ReformerConfig(n_layers=len(base["attn_layers"]), **base)


def _random_model(cfg: ReformerConfig, seed: int = 0) -> ReformerLM:
    torch.manual_seed(seed)
    model = ReformerLM(cfg).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0) so a swapped norm cannot hide
        for name, p in model.named_parameters():
            if ".norm." in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _inputs(cfg: ReformerConfig, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, length), generator=g)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_with_identical_logits(tmp_path, capsys, name):
    cfg = _config(**CONFIGS[name])
    ours = _random_model(cfg)
    ours.save_pretrained(tmp_path / "ours")
    assert main(["export-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr().err

    hf = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.attn_layers == cfg.attn_layers and hf.config.is_decoder
    assert torch.count_nonzero(hf.lm_head.bias) == 0
    worst = 0.0
    for length in (64, 40, 8):  # 40: both sides pad to 64 internally; 8: a single local chunk
        ids = _inputs(cfg, length)
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        assert a.shape == b.shape == (2, length, cfg.vocab_size)
        worst = max(worst, (a - b).abs().max().item())
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert a.std() > 1.0  # the logits are far from trivial
    print(f"{name}: max |ours - transformers| = {worst:.2e}")

    # and back: import-hf gives our model with identical weights and logits
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = ReformerLM.from_pretrained(tmp_path / "back").eval()
    assert back.cfg == cfg  # including fields HF has no place for (kept under "reformer_dist")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = _inputs(cfg, 64, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_transformers_model_imports_with_identical_logits(tmp_path):
    """A model made by transformers itself (not by our export) converts; its nonzero lm_head.bias, which
    transformers 5.x does not apply, is dropped with a warning."""
    hf_cfg = transformers.ReformerConfig(
        vocab_size=47,
        hidden_size=32,
        num_attention_heads=2,
        attention_head_size=16,
        feed_forward_size=40,
        attn_layers=["local", "lsh"],
        lsh_attn_chunk_length=64,
        local_attn_chunk_length=16,
        axial_pos_shape=(4, 16),
        axial_pos_embds_dim=(12, 20),
        max_position_embeddings=64,
        is_decoder=True,
        hidden_act="relu",
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        hash_seed=3,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    hf = transformers.ReformerModelWithLMHead(hf_cfg).eval()
    with torch.no_grad():
        hf.lm_head.bias.normal_()
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, notes = import_hf(tmp_path / "hf", tmp_path / "ours")
    assert any("lm_head.bias is nonzero" in n for n in notes)
    assert any("lm_head.bias" in str(w.message) for w in caught)
    ours = ReformerLM.from_pretrained(tmp_path / "ours").eval()
    got = (ours.cfg.local_chunk, ours.cfg.chunk_len, ours.cfg.hash_seed, ours.cfg.axial_pos_dims)
    assert got == (16, 64, 3, [12, 20])
    ids = torch.randint(0, 47, (3, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(attn_layers=["lsh", "full"]), "attn_layers"),
        (dict(same_bucket_only=True), "same_bucket_only"),
        (dict(allow_duplicate_attention=False), "allow_duplicate_attention"),
        (dict(causal=False), "causal"),
    ],
)
def test_export_refuses_configs_outside_hf(tmp_path, capsys, change, field):
    cfg = _config(**{**CONFIGS["all_lsh"], **change})
    with pytest.raises(UnsupportedConfigError, match=f"ReformerConfig.{field}"):
        to_hf_config(cfg)
    _random_model(cfg).save_pretrained(tmp_path / "ours")
    assert main(["export-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 2
    assert f"ReformerConfig.{field}" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(hidden_act="gelu_new"), "hidden_act"),
        (dict(axial_pos_embds=False), "axial_pos_embds"),
        (dict(attn_layers=["lsh", "global"]), "attn_layers"),
    ],
)
def test_import_refuses_configs_we_cannot_express(change, field):
    hf = {**to_hf_config(_config(**CONFIGS["all_lsh"])), **change}
    with pytest.raises(UnsupportedConfigError, match=field):
        from_hf_config(hf)


def test_config_round_trip_and_mapping():
    cfg = _config(
        **CONFIGS["local_lsh_mix"],
        n_buckets=[4, 8],
        hash_seed=7,
        dropout=0.1,
        reversible=False,
        ff_chunk_len=16,
        loss_chunk_len=32,
        head_groups=2,
    )  # head_groups: kept through HF (#23)
    hf = to_hf_config(cfg)
    got = (hf["hidden_size"], hf["attention_head_size"], hf["feed_forward_size"], hf["num_buckets"])
    assert got == (32, 16, 48, [4, 8])
    assert (hf["lsh_attn_chunk_length"], hf["local_attn_chunk_length"], hf["max_position_embeddings"]) == (64, 8, 64)
    assert hf["hidden_dropout_prob"] == 0.1 and hf["lsh_attention_probs_dropout_prob"] == 0.0
    back, notes = from_hf_config(json.loads(json.dumps(hf)))
    assert back == cfg and notes == []
    # a foreign HF config (no "reformer_dist" block) gets our defaults for the non-HF fields, and notes
    foreign = {k: v for k, v in hf.items() if k != "reformer_dist"} | {"hash_seed": None}
    back, notes = from_hf_config(foreign)
    assert back.reversible and back.ff_chunk_len == ReformerConfig().ff_chunk_len and back.hash_seed == 0
    assert any("hash_seed" in n for n in notes)
