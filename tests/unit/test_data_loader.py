"""WindowLoader: DP coverage, SP slices, exact resume, determinism; and the built-in store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reformer_dist.data.builtin import builtin_corpus, builtin_files, write_builtin
from reformer_dist.data.errors import DataError
from reformer_dist.data.loader import WindowLoader, permute
from reformer_dist.data.store import TokenStore
from reformer_dist.data.verify import verify_store
from reformer_dist.data.writer import ShardWriter

N_TOKENS = 10_007  # token at position p is p: a window's first token is its offset


class PositionTokenizer:
    vocab_size, eod_id, identity, model_file = 1 << 20, (1 << 20) - 1, "test:positions", None


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenStore:
    path = tmp_path_factory.mktemp("pos") / "store"
    with ShardWriter(path, PositionTokenizer(), shard_tokens=997) as w:  # windows cross shards
        w.add("train", np.arange(N_TOKENS))
        w.add("validation", np.arange(300))
    return TokenStore.open(path)


def epoch_windows(loader: WindowLoader) -> list[int]:
    """Offsets of the windows one pass of a non-looping loader yields, checking every batch."""
    out = []
    for batch in loader:
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.dtype == labels.dtype == torch.int64
        assert ids.shape == labels.shape == (loader.micro_batch, loader.seq_len // loader.sp_size)
        torch.testing.assert_close(labels, ids + 1)  # labels = next tokens of the same window
        out += (ids[:, 0] - batch["position_offset"]).tolist()
    return out


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 4, 5, 17, 64, 65, 1000, 4099):
        for key in (0, 1, 2**63 + 5):
            assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))
    assert permute(np.arange(100), 100, 1).tolist() != permute(np.arange(100), 100, 2).tolist()


# By hand: 10_007 tokens hold (10_007 - 1) // 64 = 156 windows of 64 + 1 tokens, with 10_006 - 156 * 64 = 22 tokens
# of slack for the epoch's shift; an epoch is whole global batches of dp x micro windows: 156 // 1 * 1 = 156,
# 156 // 6 * 6 = 156, 156 // 20 * 20 = 140.
@pytest.mark.parametrize("dp_size,micro_batch,per_epoch", [(1, 1, 156), (3, 2, 156), (4, 5, 140)])
def test_dp_ranks_cover_each_window_once(store, dp_size, micro_batch, per_epoch):
    L, n_windows, slack = 64, 156, 22
    per_rank = [
        epoch_windows(
            WindowLoader(store, seq_len=L, micro_batch=micro_batch, seed=7, dp_rank=r, dp_size=dp_size, loop=False)
        )
        for r in range(dp_size)
    ]
    loader = WindowLoader(store, seq_len=L, micro_batch=micro_batch, seed=7, dp_size=dp_size)
    assert (loader.num_windows, loader.windows_per_epoch) == (n_windows, per_epoch)
    everything = sum(per_rank, [])
    assert len(everything) == len(set(everything)) == per_epoch  # no overlap
    assert all(len(w) == per_epoch // dp_size for w in per_rank)
    offsets = np.array(sorted(everything))
    shift = offsets[0] % L
    assert 0 <= shift <= slack
    assert set(offsets - shift) <= set(range(0, n_windows * L, L))  # non-overlapping grid
    assert offsets.max() + L + 1 <= N_TOKENS
    # the ranks' blocks interleave in the global order: batch i = ranks 0..D-1, B windows each
    order = loader.window_offsets(0, np.arange(loader.windows_per_epoch)).tolist()
    for r, w in enumerate(per_rank):
        blocks = [
            order[i + r * micro_batch : i + (r + 1) * micro_batch] for i in range(0, len(order), dp_size * micro_batch)
        ]
        assert w == sum(blocks, [])
    if per_epoch == n_windows:
        assert sorted(order) == sorted(shift + L * np.arange(n_windows))


def test_epochs_differ_and_all_windows_in_range(store):
    loader = WindowLoader(store, seq_len=100, micro_batch=4, seed=1, loop=True)
    e0 = [next(iter(loader))["input_ids"][:, 0].tolist() for _ in range(loader.batches_per_epoch)]
    e1 = [next(iter(loader))["input_ids"][:, 0].tolist() for _ in range(loader.batches_per_epoch)]
    assert loader.epoch == 1 and e0 != e1
    assert len(set(sum(e0, []))) == loader.windows_per_epoch


def test_sp_slices_concatenate_to_the_window(store):
    L, S = 96, 4
    full = next(iter(WindowLoader(store, seq_len=L, micro_batch=3, seed=3, dp_rank=1, dp_size=2)))
    parts = [
        next(iter(WindowLoader(store, seq_len=L, micro_batch=3, seed=3, dp_rank=1, dp_size=2, sp_rank=s, sp_size=S)))
        for s in range(S)
    ]
    assert [p["position_offset"] for p in parts] == [0, 24, 48, 72]
    torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts], dim=1), full["input_ids"])
    torch.testing.assert_close(torch.cat([p["labels"] for p in parts], dim=1), full["labels"])
    assert full["position_offset"] == 0


def test_resume_continues_with_the_same_next_batch(store):
    kw = dict(seq_len=50, micro_batch=2, seed=11, dp_rank=1, dp_size=2)
    a = WindowLoader(store, **kw)
    it = iter(a)
    for _ in range(a.batches_per_epoch + 3):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["epoch"] == 1 and state["cursor"] == 3 * 4
    b = WindowLoader(store, **{**kw, "seed": 999})  # the seed comes from the state
    b.load_state_dict(state)
    for _ in range(a.batches_per_epoch):  # across the next epoch boundary too
        x, y = next(it), next(iter(b))
        torch.testing.assert_close(x["input_ids"], y["input_ids"])
    assert b.state_dict() == a.state_dict()
    # a resumed DP group of another size continues the same window stream, when it divides evenly
    c = WindowLoader(store, seq_len=50, micro_batch=4, seed=0, dp_rank=0, dp_size=1)
    c.load_state_dict(state)
    assert c.state_dict()["cursor"] == state["cursor"]
    with pytest.raises(DataError, match="not a multiple"):
        WindowLoader(store, seq_len=50, micro_batch=5, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=50.*has 64"):
        WindowLoader(store, seq_len=64, micro_batch=2, seed=0).load_state_dict(state)


def test_deterministic_given_seed(store):
    def first(seed):
        return [b["input_ids"] for b, _ in zip(WindowLoader(store, seq_len=128, micro_batch=2, seed=seed), range(5))]

    for x, y in zip(first(5), first(5)):
        torch.testing.assert_close(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(first(5), first(6)))


def test_loop_false_stops_at_epoch_end(store):
    val = WindowLoader(store, split="validation", seq_len=32, micro_batch=2, loop=False)
    assert val.num_windows == 9 and val.windows_per_epoch == 8 and val.batches_per_epoch == 4
    assert len(list(val)) == 4 and val.state_dict()["epoch"] == 1
    assert len(list(val)) == 4  # iterating again is the next epoch


def test_store_too_small_says_how_many_tokens(store):
    with pytest.raises(DataError, match=r"'validation' has 300 tokens; a window of seq_len 300 needs 301"):
        WindowLoader(store, split="validation", seq_len=300)
    with pytest.raises(DataError, match=r"9 windows .* fewer than one global micro-batch"):
        WindowLoader(store, split="validation", seq_len=32, micro_batch=5, dp_size=2)
    with pytest.raises(ValueError, match="not divisible by sp_size"):
        WindowLoader(store, seq_len=100, sp_size=3)


def test_builtin_store(tmp_path: Path):
    store = TokenStore.open("builtin", expect_tokenizer="bytes")
    assert store.vocab_size == 257 and store.eod_id == 256
    arrays, _ = builtin_corpus()  # no cached store: every open builds its own from the same arrays
    assert TokenStore.open("builtin") is not store and store.num_tokens("train") == arrays["train"].size
    assert 2_000_000 < store.num_tokens("train") < 5_000_000 and store.num_tokens("validation") > 100_000
    files = builtin_files()
    assert files == sorted(files) and store.num_documents("train") + store.num_documents("validation") == len(files)
    first = store.read("train", 0, files[0].stat().st_size)
    assert store.tokenizer.decode(first) == files[0].read_text(encoding="utf-8")
    batch = next(iter(WindowLoader(store, seq_len=1024, micro_batch=2)))
    assert batch["input_ids"].max() < 257
    # written to disk it is an ordinary store with the same tokens
    verify_store(write_builtin(tmp_path / "b").parent)
    disk = TokenStore.open(tmp_path / "b")
    for split in ("train", "validation"):
        n = store.num_tokens(split)
        assert disk.num_tokens(split) == n
        np.testing.assert_array_equal(disk.read(split, 0, n), store.read(split, 0, n))
