"""Document masks for packed windows (float64): documents cannot see or move each other, bit for bit."""

from __future__ import annotations

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.kernels import blockwise
from reformer_dist.model.documents import document_ids, positions_in_document
from reformer_dist.model.hashing import make_rotations
from reformer_dist.model.local_attention import local_attention
from reformer_dist.model.lsh_attention import lsh_attention
from reformer_dist.parallel.sequence import document_inputs

EOD = 1


def test_document_ids_and_positions():
    ids = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    assert document_ids(ids, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert positions_in_document(document_ids(ids, EOD)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_document_inputs_of_one_process():
    # what the trainer hands the model (the SP gather is tests/distributed/test_train_sp.py's)
    ids = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    assert document_inputs(ids, EOD, reset_positions=False).keys() == {"document_ids"}
    out = document_inputs(ids, EOD, reset_positions=True)
    assert out["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert out["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def packed(lengths: list[int], vocab: int, seed: int) -> torch.Tensor:
    """One window of documents of the given lengths, each ended by EOD (no other EOD inside)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.cat([torch.randint(2, vocab, (n - 1,), generator=g), torch.tensor([EOD])]) for n in lengths]
    return torch.cat(parts).unsqueeze(0)


def cfg(layers: list[str], **kw) -> ReformerConfig:
    base = dict(
        vocab_size=23,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_ff=32,
        n_layers=len(layers),
        attn_layers=layers,
        n_hashes=3,
        chunk_len=8,
        local_chunk_len=8,
        axial_pos_shape=[8, 16],
        ff_chunk_len=24,
        loss_chunk_len=40,
    )
    base.update(kw)
    return ReformerConfig(**base)


@pytest.mark.parametrize("layers", [["lsh", "lsh"], ["local", "local"], ["full", "lsh", "local"]])
@pytest.mark.parametrize("core", ["auto", "blockwise"])
@pytest.mark.parametrize("reset", [False, True])
def test_changing_one_document_changes_no_logit_of_the_others(layers, core, reset, monkeypatch):
    if core == "blockwise":  # several blocks per round
        monkeypatch.setattr(blockwise, "_BLOCK_ELEMS", 64)
    torch.manual_seed(0)
    model = ReformerLM(cfg(layers)).double()
    lengths = [13, 21, 9, 18]  # 61 tokens: padded to 64 inside
    ids = packed(lengths, 23, seed=1)
    other = ids.clone()
    s, e = lengths[0], lengths[0] + lengths[1] - 1  # every token of document 1 but its EOD
    other[0, s:e] = (ids[0, s:e] - 2 + 1 + torch.randint(1, 20, (e - s,))) % 21 + 2
    assert (other[0, s:e] != ids[0, s:e]).all() and (other != EOD).sum() == (ids != EOD).sum()

    def logits(x):
        docs = document_ids(x, EOD)
        return model(x, document_ids=docs, positions=positions_in_document(docs) if reset else None, hash_seed=4)

    a, b = logits(ids), logits(other)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[s : e + 1] = False
    assert torch.equal(a[0, keep], b[0, keep])
    assert not torch.allclose(a[0, s + 1 : e + 1], b[0, s + 1 : e + 1])  # the changed document did change
    # and the masks matter: without documents the other documents' logits move
    c, d = model(ids, hash_seed=4), model(other, hash_seed=4)
    assert not torch.equal(c[0, keep], d[0, keep])


def test_loss_and_gradients_respect_documents_in_the_reversible_backward():
    """Training path: a document's tokens get no gradient contribution from another document's loss."""
    torch.manual_seed(0)
    model = ReformerLM(cfg(["lsh", "local"])).double()
    ids = packed([20, 20, 24], 23, seed=2)
    docs = document_ids(ids, EOD)
    emb = model.tok_emb.weight
    labels = torch.full_like(ids, -100)
    labels[0, 45:60] = ids[0, 46:61]  # loss only inside document 2
    loss = model(ids, labels, document_ids=docs, hash_seed=1)
    (g,) = torch.autograd.grad(loss, emb)
    seen_elsewhere = set(ids[0, :40].tolist()) - set(ids[0, 40:].tolist())
    assert seen_elsewhere and all(g[t].abs().max() == 0 for t in seen_elsewhere)
    assert g[ids[0, 45]].abs().max() > 0


def test_full_attention_with_reset_positions_equals_each_document_alone():
    torch.manual_seed(0)
    model = ReformerLM(cfg(["full", "full"])).double()
    lengths = [11, 17, 8]
    ids = packed(lengths, 23, seed=3)
    docs = document_ids(ids, EOD)
    together = model(ids, document_ids=docs, positions=positions_in_document(docs))
    start = 0
    for n in lengths:
        alone = model(ids[:, start : start + n])
        torch.testing.assert_close(together[:, start : start + n], alone, rtol=0, atol=1e-12)
        start += n


@pytest.mark.parametrize("kind", ["lsh", "local"])
def test_a_token_with_no_earlier_token_in_its_document_attends_to_itself_only(kind):
    g = torch.Generator().manual_seed(5)
    b, l, h, d = 1, 48, 2, 8
    q, k, v = (torch.randn(b, l, h, d, dtype=torch.float64, generator=g) for _ in range(3))
    docs = torch.tensor([[0] * 10 + [1] * 20 + [2] * 18], dtype=torch.int32)
    if kind == "lsh":
        out = lsh_attention(
            q,
            v,
            make_rotations(0, h, d, 2, [4]),
            [4],
            chunk_len=8,
            n_chunks_before=1,
            n_chunks_after=0,
            causal=True,
            document_ids=docs,
        )
    else:
        out = local_attention(q, k, v, chunk_len=8, n_chunks_before=1, n_chunks_after=0, causal=True, document_ids=docs)
    for first in (0, 10, 30):
        torch.testing.assert_close(out[0, first], v[0, first], rtol=0, atol=1e-12)
    assert not torch.allclose(out[0, 31], v[0, 31])
