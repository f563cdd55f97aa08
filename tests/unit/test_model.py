"""ReformerLM: API, chunked loss, padding, axial positions, config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model.reformer import shift_labels


def cfg(**kw) -> ReformerConfig:
    base = dict(
        vocab_size=40,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_ff=64,
        n_layers=2,
        chunk_len=8,
        axial_pos_shape=[16, 16],
        loss_chunk_len=7,
        ff_chunk_len=10,
    )
    base.update(kw)
    return ReformerConfig(**base)


def test_public_api_and_logits_shape():
    m = ReformerLM(cfg())
    ids = torch.randint(0, 40, (3, 64))
    assert m(ids).shape == (3, 64, 40)


def test_chunked_loss_equals_unchunked_loss_and_gradient():
    torch.manual_seed(0)
    m = ReformerLM(cfg()).double()
    ids = torch.randint(0, 40, (2, 64))
    labels = shift_labels(ids)
    labels[0, 5] = -100

    def grads(loss):  # .backward(): reversible layers accumulate their gradients inside their own backward
        m.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in m.parameters()]

    loss = m.loss(ids, labels, hash_seed=4)
    g_chunked = grads(loss)
    logits = m(ids, hash_seed=4)  # full logits: fine at this size
    ref = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    g_ref = grads(ref)
    assert abs(loss.item() - ref.item()) < 1e-12
    for a, b in zip(g_chunked, g_ref):
        assert (a - b).abs().max().item() < 1e-10


def test_default_labels_are_shifted_inputs():
    torch.manual_seed(0)
    m = ReformerLM(cfg())
    ids = torch.randint(0, 40, (1, 32))
    assert m.loss(ids).item() == m(ids, shift_labels(ids)).item()
    assert shift_labels(ids)[0, :-1].tolist() == ids[0, 1:].tolist() and shift_labels(ids)[0, -1] == -100


@pytest.mark.parametrize("length", [1, 7, 8, 9, 63, 65, 100])
def test_any_length_is_padded_internally(length):
    torch.manual_seed(0)
    m = ReformerLM(cfg(attn_layers=["lsh", "local"], local_chunk_len=4))
    ids = torch.randint(0, 40, (2, length))
    out = m(ids)
    assert out.shape == (2, length, 40) and torch.isfinite(out).all()
    assert torch.isfinite(m.loss(ids)) if length > 1 else True


def test_causal_model_ignores_the_future():
    """Changing the last token does not change earlier logits (local and full layers; LSH with one chunk)."""
    torch.manual_seed(0)
    m = ReformerLM(cfg(attn_layers=["local", "full"], chunk_len=64)).eval()
    ids = torch.randint(0, 40, (1, 48))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 40
    assert torch.allclose(m(ids)[:, :-1], m(ids2)[:, :-1], atol=1e-6)


def test_axial_positions_are_row_col_concat():
    m = ReformerLM(cfg())
    pos = torch.tensor([0, 1, 17, 255])
    e = m.pos_emb(pos)
    assert torch.equal(e[2], torch.cat([m.pos_emb.rows[1], m.pos_emb.cols[1]]))
    assert torch.equal(e[3], torch.cat([m.pos_emb.rows[15], m.pos_emb.cols[15]]))


def test_bucket_factors_rule():
    c = ReformerConfig(chunk_len=64, axial_pos_shape=[1024, 1024], d_model=64, n_heads=1, d_head=64)
    assert c.bucket_factors(4096) == [128]
    assert c.bucket_factors(1 << 20) == [128, 256]  # factorised: 384/2 rotation columns, not 16384
    assert ReformerConfig(n_buckets=[4, 8]).bucket_factors(10**6) == [4, 8]


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(d_model=30), "d_model"),
        (dict(axial_pos_dims=[10, 10]), "axial_pos_dims"),
        (dict(chunk_len=0), "chunk_len"),
        (dict(n_hashes=0), "n_hashes"),
        (dict(attn_layers=["lsh", "dense"]), "attn_layers"),
        (dict(attn_layers=["lsh"]), "attn_layers"),
        (dict(n_buckets=3), "n_buckets"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_chunks_after=1), "n_chunks_after"),
        (dict(activation="tanh"), "activation"),
    ],
)
def test_invalid_config_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"ReformerConfig\.{field}"):
        cfg(**kw)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="n_hedas"):
        ReformerConfig.from_dict({"n_hedas": 4})


def test_token_ids_outside_vocab_rejected():
    m = ReformerLM(cfg())
    with pytest.raises(ValueError, match="vocab_size=40"):
        m(torch.tensor([[1, 2, 40]]))
    with pytest.raises(ValueError, match="vocab_size"):
        m(torch.tensor([[-1, 2]]))


def test_too_long_sequence_names_axial_shape():
    m = ReformerLM(cfg())
    with pytest.raises(ValueError, match="axial_pos_shape"):
        m(torch.zeros(1, 257, dtype=torch.long))


def test_save_and_load_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = ReformerLM(cfg())
    m.save_pretrained(tmp_path)
    m2 = ReformerLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 40, (1, 32))
    assert torch.equal(m(ids), m2(ids))
    assert m2.cfg == m.cfg


def test_generate_extends_prompt():
    torch.manual_seed(0)
    m = ReformerLM(cfg()).eval()
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and out[0, :3].tolist() == [1, 2, 3]


def test_bf16_autocast_keeps_fp32_streams_and_trains():
    torch.manual_seed(0)
    m = ReformerLM(cfg())
    ids = torch.randint(0, 40, (1, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = m.hidden_states(ids)
        loss = m.loss(ids)
    assert h.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
