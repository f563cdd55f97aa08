"""benchmarks/predict_step.py: the op counts behind the predicted H100 step time match the model they describe."""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model import hashing

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("predict_step", BENCHMARKS / "predict_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ps = load_script()
PROJ, FF, CORE = "projections (qk/q,k,v, out)", "feed-forward", "attention core (Triton kernels)"


def tiny_config(**kw) -> ReformerConfig:
    base = dict(
        vocab_size=16,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_ff=64,
        n_layers=1,
        n_hashes=1,
        chunk_len=16,
        n_buckets=4,
        axial_pos_shape=[8, 8],
    )
    base.update(kw)
    return ReformerConfig(**base)


def linear_weights(model: ReformerLM, names: tuple[str, ...]) -> int:
    """Weight-matrix elements of the stack's Linear layers whose qualified name ends with one of ``names``."""
    return sum(
        m.weight.numel() for n, m in model.stack.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(names)
    )


# aten ops that only make views or allocate (no kernel on a GPU)
_NO_KERNEL = {
    "view",
    "_unsafe_view",
    "_reshape_alias",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "as_strided",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "narrow",
    "unbind",
    "chunk",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "lift_fresh",
}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))


class OpBytes(TorchDispatchMode):
    """Every dispatched aten op that launches a kernel: count, and bytes of its tensor inputs plus outputs (what a
    GPU kernel moves, except where an op's schema says more: copy_ writes its destination without reading it,
    nll_loss reads one logit per row)."""

    def __init__(self, paused: list[int] | None = None):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.paused = paused or [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused[0] and name not in _NO_KERNEL:
            self.ops[name] += 1
            if name == "copy_":
                moved = _nbytes(args[1]) + _nbytes(args[0])
            elif name == "nll_loss_forward":
                moved = _nbytes((args[1], out)) + args[1].numel() * args[0].element_size()
            else:
                moved = _nbytes((args, kwargs, out))
            self.bytes[name] += moved
        return out


def test_hashing_counts_are_the_ops_hash_buckets_dispatches(monkeypatch):
    # several hash blocks, two bucket factors, under bf16 autocast as in training
    monkeypatch.setattr(hashing, "_HASH_BLOCK_ELEMS", 1 << 12)
    factors, h, d, r, length = [8, 16], 2, 64, 2, 1024
    x = torch.randn(1, length, h, d, dtype=torch.bfloat16)
    rot = hashing.make_rotations(1, h, d, r, factors)
    counter = OpBytes()
    with counter, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hashing.hash_buckets(x, rot, factors)
    cost = ps.hashing_cost(1, length, h, d, r, factors)
    rotations = ps.F4 * h * d * r * 12  # make_rotations' randn (drawn outside the counter here), 2 launches
    assert sum(counter.ops.values()) == cost.launches - 2 == 13 * 22  # 13 blocks of 22 ops (fp32: no autocast casts)
    assert sum(counter.bytes.values()) == pytest.approx(cost.bytes - rotations, rel=0.01)


def test_every_pytorch_op_of_a_real_step_is_counted(monkeypatch):
    """The real step on CPU (bf16 autocast, the Triton kernels through the interpreter): the bytes and launches of
    the aten ops it dispatches, forward and backward, against the script's count of everything but the kernels
    themselves (which no dispatcher sees) and the sort (counted by cub's passes, one aten op here)."""
    import triton.runtime.interpreter as interpreter

    monkeypatch.setattr(hashing, "_HASH_BLOCK_ELEMS", 1 << 10)  # 8 hash blocks
    paused = [0]
    launch = interpreter.GridExecutor.__call__

    def interpreted(self, *a, **k):  # tensor ops inside an interpreted kernel are not GPU launches
        paused[0] += 1
        try:
            return launch(self, *a, **k)
        finally:
            paused[0] -= 1

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", interpreted)
    cfg = ReformerConfig(
        vocab_size=64,
        d_model=64,
        n_heads=2,
        d_head=32,
        d_ff=128,
        n_layers=1,
        n_hashes=2,
        chunk_len=32,
        axial_pos_shape=[16, 32],
        ff_chunk_len=128,
        loss_chunk_len=160,
        attention_backend="triton",
    )
    torch.manual_seed(0)
    model = ReformerLM(cfg)
    ids = torch.randint(0, 64, (1, 256))
    fwd, bwd = OpBytes(paused), OpBytes(paused)
    with fwd, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids, hash_seed=1)
    with bwd:
        loss.backward()
    step = ps.predict(256, cfg, optimizer=False)
    skip = (CORE, "sort (argsort per round)")
    perm = ps.ew(8 * 2 * 256, 4 * 2 * 256) * 2  # what stays of the sort: the permutation stored as int32, per round
    for counter, phases in ((fwd, ("forward",)), (bwd, ("recompute", "backward"))):
        cost = sum((step.terms[t][p] for t in ps.TERMS if t not in skip for p in phases), perm)
        assert sum(counter.bytes.values()) - counter.bytes["sort"] == pytest.approx(cost.bytes, rel=0.02)
        assert sum(counter.ops.values()) - counter.ops["sort"] == pytest.approx(cost.launches, rel=0.1)


def test_projection_and_ff_flops_are_6_params_tokens_plus_the_recompute():
    # forward 2PT + backward 4PT = 6PT, and the reversible backward recomputes the forward: + 2PT (1/3 of 6PT)
    cfg = ReformerConfig(
        vocab_size=32,
        d_model=64,
        n_heads=4,
        d_head=16,
        d_ff=128,
        n_layers=3,
        attn_layers=["lsh", "local", "lsh"],
        chunk_len=16,
        axial_pos_shape=[16, 32],
        ff_chunk_len=96,
        loss_chunk_len=100,
    )
    with torch.device("meta"):
        model = ReformerLM(cfg)
    tokens = 512
    step = ps.predict(tokens, cfg)
    proj = linear_weights(model, ("query_key", "query", "key", "value", "f.out"))
    ff = linear_weights(model, ("g.dense", "g.out"))
    assert proj == 2 * 2 * 64 * 64 + 3 * 64 * 64 + 3 * 64 * 64  # two LSH layers (qk, v, out), one local (q, k, v, out)
    for term, params in ((PROJ, proj), (FF, ff)):
        phases = step.terms[term]
        assert phases["forward"].mm == 2 * params * tokens
        assert phases["recompute"].mm == 2 * params * tokens
        assert phases["backward"].mm == 4 * params * tokens
        assert sum(c.mm for c in phases.values()) == 6 * params * tokens * 4 / 3
    assert step.n_params() == model.num_parameters()


@pytest.mark.parametrize("length", [16384, 1 << 20, 1 << 22])
def test_parameter_count_of_the_bench_config_is_the_models(length):
    with torch.device("meta"):
        model = ReformerLM(ps.bench_config(length))
    assert ps.predict(length).n_params() == model.num_parameters()


def test_attention_core_counts_scale_linearly_in_length():
    per_token = []
    for length in (16384, 65536, 1 << 20, 1 << 22):
        step = ps.predict(length)
        core = sum(step.terms[CORE].values(), ps.Cost())
        glue = sum(step.terms["attention glue (round merge, delta, grad casts)"].values(), ps.Cost())
        per_token.append(
            (core.mm / length, core.vec / length, core.exp / length, core.bytes / length, glue.bytes / length)
        )
    for row in per_token[1:]:
        assert row == pytest.approx(per_token[0], rel=1e-12)
    # the hashing in front of it is not flat: its rotated columns grow with the bucket count (HF's rule, ~sqrt(L))
    hashing = [
        sum(ps.predict(n).terms["hashing (rotations + argmax)"].values(), ps.Cost()).mm / n for n in (16384, 1 << 22)
    ]
    cols = [sum(f // 2 for f in ps.bench_config(n).bucket_factors(n)) for n in (16384, 1 << 22)]
    assert hashing[1] / hashing[0] == pytest.approx(cols[1] / cols[0])


def test_tiny_case_by_hand_and_against_torchs_flop_counter():
    # 1 LSH layer, d_model 32 = 2 heads x 16, d_ff 64, vocab 16, 1 round, chunk 16 (1 before), 4 buckets, 64 tokens
    cfg = tiny_config()
    t = 64
    proj_ff = 8 * (3 * 32 * 32 + 2 * 32 * 64) * t  # qk, v, out; dense, out: fwd 2 + recompute 2 + bwd 4 per weight
    head = 2 * (2 * 32) * 16 * t * 4  # logits [64, 64] x [64, 16]: forward, recompute, dh, dW
    hashing = 2 * (2 * t * 2 * 16 * 1 * 2)  # x [64, 2 heads, 16] @ rotations [16, 2 columns]: forward + recompute
    # core: 128 query slots (64 per head), each against 2 chunks x 16 keys of 16 dims: 2 * 32 * 16 per matmul
    per_matmul = 128 * 2 * 32 * 16
    triton = (2 + 2 + 3 + 4) * per_matmul  # _fwd (QK, PV) twice, _bwd_dq (QK, dO.V, dS.K), _bwd_dkdv (4)
    step = ps.predict(t, cfg)
    assert step.total().mm == proj_ff + head + hashing + triton == 5_652_480
    # the forward kernel's bytes: 8 programs (4 chunks x 2 heads); each reads 16 query indices, 16 q rows (bf16),
    # for each of 2 window chunks 16 key indices and 16 k and v rows, and writes 16 output rows and (m, l)
    program = 16 * 4 + 16 * 16 * 2 + 2 * (16 * 4 + 2 * 16 * 16 * 2) + 16 * 16 * 2 + 2 * 16 * 4
    assert step.terms[CORE]["forward"].bytes == 8 * program == 27136
    # the real model on CPU runs the blockwise core, whose backward forms 5 matmuls instead of the kernels' 7:
    # every other matmul the script counts is one torch's counter sees
    blockwise = (2 + 2 + 5) * per_matmul
    model = ReformerLM(tiny_config(attention_backend="blockwise"))
    ids = torch.randint(0, 16, (1, t), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, ids, hash_seed=1).backward()
    assert counter.get_total_flops() == proj_ff + head + hashing + blockwise


def test_step_time_is_the_sum_of_the_terms_and_mfu_uses_train_steps_definition():
    step = ps.predict(1 << 20)
    rows = step.table()
    no_opt = [r for r in rows if not r["term"].startswith("AdamW")]
    assert step.step_seconds(adjusted=False, optimizer=False) == pytest.approx(sum(r["roofline_s"] for r in no_opt))
    assert step.step_seconds(adjusted=True, optimizer=False) == pytest.approx(sum(r["adjusted_s"] for r in no_opt))
    for r in rows:  # the pure roofline is a lower bound of the adjusted time, op by op
        assert r["adjusted_s"] >= r["roofline_s"]
    s = step.summary()
    tokens, params = 1 << 20, step.n_params()
    flops = 6 * params * tokens + 4 * 6 * 2 * 8 * 64 * 128 * tokens * 3
    assert s["roofline_mfu"] == pytest.approx(flops / s["roofline_step_s"] / 790e12)
    assert s["roofline_tok_s"] == pytest.approx(tokens / s["roofline_step_s"])


def test_h200_differs_only_in_memory_bound_time():
    h100, h200 = ps.predict(1 << 20), ps.predict(1 << 20, gpu="h200")
    assert h200.total().bytes == h100.total().bytes and h200.total().mm == h100.total().mm
    ff = h100.term_totals()[FF]
    assert h200.term_totals()[FF].roofline_s(h200.hbm) < ff.roofline_s(h100.hbm)
    memory_bound = h100.term_totals()["residual streams (add, sub, casts)"]
    assert memory_bound.roofline_s(4.8e12) == pytest.approx(memory_bound.bytes / 4.8e12)


def test_cli_json_config_and_compare(tmp_path, capsys):
    out = tmp_path / "pred.json"
    ps.main(["--lengths", "16384,65536", "--json", str(out), "--quiet"])
    data = json.loads(out.read_text())
    assert [r["length"] for r in data["summary"]] == [16384, 65536]
    assert len(data["steps"][0]["largest"]) == 3
    ps.main(["--config", str(BENCHMARKS.parent / "configs" / "million_1gpu.toml"), "--json", str(out), "--quiet"])
    assert json.loads(out.read_text())["summary"][0]["length"] == 1048576
    steps = tmp_path / "steps.json"
    steps.write_text(
        json.dumps(
            {
                "device": "cuda",
                "rows": [
                    {"system": "ours", "length": 16384, "tok_s": 250000.0, "mfu": 0.03},
                    {"system": "hf", "length": 16384, "tok_s": 200000.0},
                ],
            }
        )
    )
    ps.main(["--compare", str(steps), "--json", str(out)])
    rows = json.loads(out.read_text())["compare"]
    assert len(rows) == 1 and rows[0]["measured_tok_s"] == 250000.0
    assert rows[0]["measured_over_adjusted"] == pytest.approx(250000.0 / ps.predict(16384).summary()["adjusted_tok_s"])
    assert "predicted adjusted" in capsys.readouterr().out


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "steps.json"
    bad.write_text(json.dumps({"rows": [{"length": 4096}]}))
    with pytest.raises(SystemExit, match="--compare .*expected"):
        ps.main(["--compare", str(bad)])
    with pytest.raises(SystemExit, match="--lengths"):
        ps.main(["--lengths", "16k"])
    with pytest.raises(SystemExit, match="--lengths: 100000 tokens exceed"):
        ps.main(["--config", str(BENCHMARKS.parent / "configs" / "quickstart.toml"), "--lengths", "100000"])
