"""Run config: layering, validation errors that name the key, batch arithmetic, DeepSpeed dict, schedule."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from reformer_dist.training.config import ConfigError, load_run_config, plan_batches, to_toml
from reformer_dist.training.deepspeed_config import build_deepspeed_config
from reformer_dist.training.schedule import lr_at

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def err(tmp_path: Path, toml: str = "", overrides: tuple[str, ...] = ()) -> str:
    p = tmp_path / "run.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_run_config(p, overrides)
    return str(e.value)


@pytest.mark.parametrize(
    "toml, overrides, starts",
    [
        ("[train]\nlr = -1\n", (), "train.lr: expected a positive number"),
        ('[train]\nlr = "fast"\n', (), "train.lr: expected a positive number"),
        ("[model]\nn_hedas = 4\n", (), "model.n_hedas: unknown key"),
        ('[model]\nd_model = "256"\n', (), "model.d_model: expected int"),
        ("[model]\nd_model = 100\n", (), "model.d_model: must equal n_heads * d_head"),
        ("[model]\nn_buckets = 3\n", (), "model.n_buckets:"),
        ("[model]\naxial_norm_std = -1.0\n", (), "model.axial_norm_std: expected a number >= 0"),
        ("[model]\ninit_std = nan\n", (), "model.init_std: expected a number >= 0"),
        ("[trian]\nlr = 1e-3\n", (), "trian: unknown section"),
        ("[train]\nmicro_batch = 0\n", (), "train.micro_batch: expected a positive integer"),
        ("[train]\nbetas = [0.9]\n", (), "train.betas: expected two numbers"),
        ('[train]\ndecay = "exp"\n', (), "train.decay: expected one of"),
        ("[train]\nrequeue = 1\n", (), "train.requeue: expected true or false"),
        ("[data]\nseq_len = 100000\n", (), "data.seq_len: 100000 exceeds the model's maximum length"),
        ('[data]\neval_split = "val"\n', (), "data.eval_split: expected one of"),
        ("[deepspeed]\nzero_stage = 4\n", (), "deepspeed.zero_stage: expected 0, 1, 2 or 3"),
        ('[deepspeed]\nconfig = "nope.json"\n', (), "deepspeed.config: no such file"),
        ("[logging]\nverbose = true\n", (), "logging.verbose: unknown key"),
        ("", ("train.lr=0",), "train.lr: expected a positive number"),
        ("", ("train.nope=1",), "train.nope: unknown key"),
        ("", ("foo.bar=1",), "foo.bar: unknown section"),
        ("", ("trainlr=1",), "--set 'trainlr=1': expected section.key=value"),
        ("[data]\nreset_positions = true\n", (), "data.reset_positions: needs data.document_masking"),
        ("[parallel]\nsequence_parallel_size = 4\nulysses_size = 3\n", (), "parallel.ulysses_size: 3 must divide"),
        (
            "[parallel]\nsequence_parallel_size = 2\nulysses_size = 1\n[data]\ndocument_masking = true\n",
            (),
            "data.document_masking: not supported with bucket sharding",
        ),
        (
            "[parallel]\nsequence_parallel_size = 2\n[data]\nseq_len = 100\n",
            (),
            "data.seq_len=100 must be a multiple of parallel.sequence_parallel_size=2 and of the chunk length(s) 64",
        ),
        (
            "[parallel]\nsequence_parallel_size = 4\nulysses_size = 4\n[model]\nn_heads = 2\nd_head = 128\n",
            (),
            "parallel.ulysses_size=4 must divide model.n_heads=2 (Ulysses shards heads; leave parallel.ulysses_size "
            "unset for the largest size that divides both",
        ),
        (
            "[parallel]\nsequence_parallel_size = 4\n[model]\nn_heads = 2\nd_head = 128\n"
            "[data]\ndocument_masking = true\n",
            (),
            "data.document_masking: not supported with bucket sharding (parallel.ulysses_size < "
            "parallel.sequence_parallel_size); use pure Ulysses [parallel.ulysses_size = 2 (chosen: model.n_heads = 2 "
            "is not a multiple of parallel.sequence_parallel_size = 4",
        ),
        (
            '[parallel]\nsequence_parallel_size = 2\nulysses_size = 1\n[model]\nattn_layers = ["full", "lsh"]\n'
            "n_layers = 2\n",
            (),
            "model.attn_layers[0] = 'full' needs the whole sequence",
        ),
        (
            "[parallel]\nsequence_parallel_size = 8\nulysses_size = 1\n[data]\nseq_len = 128\n",
            (),
            "data.seq_len=128: each of the 8 bucket ranks",
        ),
        ("[model]\nhead_groups = 3\n", (), "model.head_groups: expected 0 (by length) or a divisor of n_heads=4"),
        (
            "[parallel]\nsequence_parallel_size = 2\n[model]\nhead_groups = 4\n",
            (),
            "model.head_groups: 4 must divide the 2 heads of each of the 2 Ulysses ranks",
        ),
    ],
)
def test_errors_name_the_key(tmp_path, toml, overrides, starts):
    assert err(tmp_path, toml, overrides).startswith(starts)


def test_sequence_parallel_over_more_ranks_than_heads_picks_a_2d_layout():
    # #26: P = 4 ranks with 2 heads failed asking for parallel.ulysses_size = 1; the default now works
    cfg = load_run_config(None, ["parallel.sequence_parallel_size=4", "model.n_heads=2", "model.d_head=128"])
    assert (cfg.parallel.ulysses_size, cfg.parallel.heads_group_size, cfg.parallel.bucket_sharding) == (2, 2, True)
    assert cfg.parallel.auto_note.startswith(
        "parallel.ulysses_size = 2 (chosen: model.n_heads = 2 is not a multiple "
        "of parallel.sequence_parallel_size = 4; the largest size dividing both "
        "shards heads, the other 2 shard LSH's sorted order by bucket)"
    )
    assert "auto_note" not in cfg.to_dict()["parallel"]
    cfg = load_run_config(
        None,
        [
            "parallel.sequence_parallel_size=6",
            "model.n_heads=4",
            "model.d_head=64",
            "data.seq_len=768",
            "model.axial_pos_shape=[32,32]",
        ],
    )
    assert cfg.parallel.ulysses_size == 2  # gcd(6, 4)
    cfg = load_run_config(None, ["parallel.sequence_parallel_size=2", "model.n_heads=4", "model.d_head=64"])
    assert cfg.parallel.ulysses_size is None and cfg.parallel.auto_note is None  # pure Ulysses, as before
    cfg = load_run_config(
        None, ["parallel.sequence_parallel_size=4", "parallel.ulysses_size=1", "model.n_heads=2", "model.d_head=128"]
    )
    assert cfg.parallel.ulysses_size == 1 and cfg.parallel.auto_note is None  # explicit wins


def test_layering_defaults_file_overrides(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[train]\nlr = 1e-3\nmax_steps = 50\n[data]\npath = "builtin"\n')
    cfg = load_run_config(
        p, ["train.lr=5e-4", "data.path=/data/my store", 'model.attn_layers=["lsh","local"]', "train.global_batch=none"]
    )
    assert cfg.train.lr == 5e-4 and cfg.train.max_steps == 50  # override beats file, file beats default
    assert cfg.data.path == "/data/my store"  # bare strings need no TOML quotes
    assert cfg.model.attn_layers == ["lsh", "local"] and cfg.train.global_batch is None
    assert cfg.train.warmup_steps == 100  # untouched default


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_run_config(None, ["train.lr=1e-3", 'output.sample_prompt=say "hi"\\n'])
    p = tmp_path / "resolved.toml"
    p.write_text(to_toml(cfg))
    again = load_run_config(p)
    assert again.to_dict() == cfg.to_dict()


def test_deepspeed_config_path_is_relative_to_the_toml(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "run.toml").write_text('[deepspeed]\nconfig = "ds/z.json"\n')
    cfg = load_run_config(tmp_path / "run.toml")
    assert Path(cfg.deepspeed.config) == (tmp_path / "ds" / "z.json").resolve()


def plan_from_toml(raw: dict, world: int) -> dict:
    """The batch plan a config file asks for, from its raw TOML by the documented rule (not via plan_batches):
    dp = world / sp; grad_accum = global_batch / (micro_batch * dp) when global_batch is set, else grad_accum
    (default 1); global batch = micro_batch * grad_accum * dp."""
    train, sp = raw["train"], raw.get("parallel", {}).get("sequence_parallel_size", 1)
    assert world % sp == 0, f"sequence_parallel_size {sp} must divide the world size {world}"
    dp, micro = world // sp, train["micro_batch"]
    if "global_batch" in train:
        assert train["global_batch"] % (micro * dp) == 0
        accum = train["global_batch"] // (micro * dp)
        assert train.get("grad_accum", accum) == accum
    else:
        accum = train.get("grad_accum", 1)
    return dict(
        world_size=world,
        sp_size=sp,
        dp_size=dp,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=micro * accum * dp,
        seq_len=raw["data"]["seq_len"],
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    raw = tomllib.loads(path.read_text())
    cfg = load_run_config(path)
    # the loaded config holds the file's values
    assert (cfg.train.micro_batch, cfg.data.seq_len) == (raw["train"]["micro_batch"], raw["data"]["seq_len"])
    assert cfg.train.global_batch == raw["train"].get("global_batch")
    sp = raw.get("parallel", {}).get("sequence_parallel_size", 1)
    assert cfg.parallel.sequence_parallel_size == sp
    # the world sizes the config is meant for: its SP group once and twice (SP x DP), or 16 ranks for multinode
    worlds = [16] if "multinode" in path.name else [sp, 2 * sp]
    for world in worlds:
        plan = plan_batches(cfg, world)
        want = plan_from_toml(raw, world)
        assert dataclasses.asdict(plan) == want, (world, plan)
        assert plan.global_batch == plan.micro_batch * plan.grad_accum * plan.dp_size
        assert plan.tokens_per_step == want["global_batch"] * want["seq_len"]
        assert plan.sp_size * plan.dp_size == world


# The batch arithmetic the configs' header comments promise, worked out by hand:
# (config, world size) -> (dp, grad_accum, global batch, tokens per step)
DOCUMENTED_PLANS = {
    ("enwik8_64k.toml", 8): (8, 1, 8, 524288),  # "8 GPUs: micro 1 x accum 1 x dp 8"
    ("enwik8_64k.toml", 1): (1, 8, 8, 524288),  # "1 GPU: micro 1 x accum 8 x dp 1"
    ("multinode_zero3.toml", 16): (16, 4, 64, 4194304),  # "16 GPUs: micro 1 x accum 4 x dp 16", 4.2M tokens
    ("multinode_zero3.toml", 64): (64, 1, 64, 4194304),  # "64 GPUs: micro 1 x accum 1 x dp 64"
    ("million_sp8.toml", 8): (1, 4, 4, 33554432),  # "micro 1 x accum 4 x dp 1 (world 8 / sp 8) = 32M tokens"
    ("million_sp8.toml", 16): (2, 4, 8, 67108864),  # "With 16 GPUs the same config runs sp 8 x dp 2"
}


@pytest.mark.parametrize("name, world", sorted(DOCUMENTED_PLANS))
def test_shipped_configs_plan_what_their_comments_say(name, world):
    plan = plan_batches(load_run_config(REPO / "configs" / name), world)
    assert (plan.dp_size, plan.grad_accum, plan.global_batch, plan.tokens_per_step) == DOCUMENTED_PLANS[(name, world)]


# ---------------------------------------------------------------------------------------------- batch arithmetic
def test_global_batch_derives_grad_accum():
    cfg = load_run_config(None, ["train.micro_batch=2", "train.global_batch=16"])
    p1, p4 = plan_batches(cfg, 1), plan_batches(cfg, 4)
    assert (p1.grad_accum, p1.dp_size, p1.global_batch) == (8, 1, 16)
    assert (p4.grad_accum, p4.dp_size, p4.global_batch) == (2, 4, 16)  # same global batch on any world size


def test_batch_errors_name_the_keys():
    cfg = load_run_config(None, ["train.micro_batch=3", "train.global_batch=16"])
    with pytest.raises(ConfigError, match=r"^train.global_batch: 16 is not a multiple of .* = 3 \* 2 = 6"):
        plan_batches(cfg, 2)
    cfg = load_run_config(None, ["train.micro_batch=2", "train.global_batch=16", "train.grad_accum=3"])
    with pytest.raises(ConfigError, match="^train.grad_accum: 3 disagrees with train.global_batch"):
        plan_batches(cfg, 1)
    cfg = load_run_config(None, ["parallel.sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match="^parallel.sequence_parallel_size: 2 does not divide"):
        plan_batches(cfg, 3)


def test_deepspeed_dict_is_generated_from_the_run_config(tmp_path):
    j = tmp_path / "z.json"
    j.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "train_micro_batch_size_per_gpu": 2,
            }
        )
    )
    cfg = load_run_config(
        None,
        [
            f"deepspeed.config={j}",
            "train.micro_batch=2",
            "train.grad_accum=4",
            "deepspeed.zero_stage=3",
            "train.grad_clip=0.5",
        ],
    )
    ds = build_deepspeed_config(cfg, plan_batches(cfg, 2), on_cuda=False)
    got = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert got == (16, 2, 4)
    assert ds["zero_optimization"]["stage"] == 3  # the run config's stage wins over the JSON's
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is False  # set explicitly
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert build_deepspeed_config(cfg, plan_batches(cfg, 2), on_cuda=True)["bf16"]["enabled"] is True


@pytest.mark.parametrize(
    "body, match",
    [
        ({"train_batch_size": 64}, r"train_batch_size = 64 disagrees with the run config"),
        ({"gradient_accumulation_steps": 2}, r"gradient_accumulation_steps = 2 disagrees"),
        ({"optimizer": {"type": "Adam"}}, r"key 'optimizer' is not allowed"),
        ({"scheduler": {"type": "WarmupLR"}}, r"key 'scheduler' is not allowed"),
        ({"gradient_clipping": 5.0}, r"gradient_clipping = 5.0 disagrees with train.grad_clip"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled = True disagrees with deepspeed.precision"),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            r"zero_optimization.offload_param needs ZeRO stage 3",
        ),
    ],
)
def test_deepspeed_json_may_not_contradict_the_run_config(tmp_path, body, match):
    j = tmp_path / "z.json"
    j.write_text(json.dumps(body))
    cfg = load_run_config(None, [f"deepspeed.config={j}"])
    with pytest.raises(ConfigError, match=r"^deepspeed.config \(.*\): " + match):
        build_deepspeed_config(cfg, plan_batches(cfg, 1), on_cuda=False)


def test_batch_keys_that_agree_are_accepted(tmp_path):
    j = tmp_path / "z.json"
    j.write_text(json.dumps({"train_batch_size": 4, "gradient_accumulation_steps": 2}))
    cfg = load_run_config(None, [f"deepspeed.config={j}", "train.micro_batch=1", "train.global_batch=4"])
    assert build_deepspeed_config(cfg, plan_batches(cfg, 2), on_cuda=False)["train_batch_size"] == 4


# ---------------------------------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_then_cosine_to_floor():
    t = load_run_config(
        None, ["train.lr=1.0", "train.warmup_steps=10", "train.max_steps=110", "train.min_lr_ratio=0.1"]
    ).train
    assert lr_at(1, t) == pytest.approx(0.1) and lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)  # past the end it stays at the floor
    lin = load_run_config(
        None,
        ["train.lr=1.0", "train.warmup_steps=0", "train.max_steps=10", "train.decay=linear", "train.min_lr_ratio=0"],
    ).train
    assert lr_at(5, lin) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_reports_the_key_before_any_process_group(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--config",
            str(REPO / "configs/quickstart.toml"),
            "--set",
            "model.n_hedas=4",
            "--local_rank=0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 2
    assert "reformer-train: error: model.n_hedas: unknown key" in p.stderr


@pytest.mark.slow
def test_cli_dry_run_prints_the_resolved_plan(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--config",
            str(REPO / "configs/quickstart.toml"),
            "--set",
            "train.global_batch=16",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert '"train_batch_size": 16' in p.stdout and "[model]" in p.stdout


@pytest.mark.slow
def test_ten_million_config_is_predicted_to_fit_one_141gb_gpu(tmp_path):
    """--dry-run prints the memory model's peak (reformer_dist/model/memory.py) for the run: 10M tokens of the
    bench config on one GPU fit in 141 GB with one head per group, and would not without groups."""
    import re

    from reformer_dist.model.memory import GIB, predicted_peak

    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--config",
            str(REPO / "configs/ten_million_1gpu.toml"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    m = re.search(r"# predicted peak per GPU: ([0-9.]+) GiB .*, bf16 compute, 8 head group\(s\)", p.stdout)
    assert m, p.stdout[-2000:]
    cfg = load_run_config(REPO / "configs/ten_million_1gpu.toml")
    assert cfg.data.seq_len >= 10_000_000
    want = predicted_peak(cfg.model, cfg.data.seq_len, compute_bytes=2)
    assert float(m.group(1)) == pytest.approx(want["peak"] / GIB, abs=0.05)
    assert want["peak"] < 0.97 * 141e9
    cfg.model.head_groups = 1
    assert predicted_peak(cfg.model, cfg.data.seq_len, compute_bytes=2)["peak"] > 0.97 * 141e9


def test_docs_config_table_lists_every_key():
    # docs/training.md's "Config sections" table names every key of every section but [model]
    import dataclasses
    import re

    from reformer_dist.training.config import SECTIONS

    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `\[(\w+)\]` \| (.*?) \|", (REPO / "docs/training.md").read_text(), re.M)
    }
    for section, cls in SECTIONS.items():
        if section == "model":
            continue
        named = set(re.findall(r"`(\w+)`", rows[section]))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in named]
        assert not missing, f"docs/training.md [{section}] row lacks {missing}"


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_model_attention_backend_reaches_the_attention_core(monkeypatch, backend):
    # [model] attention_backend -> ReformerConfig -> AttentionContext.backend -> kernels.chunked_attention
    import torch

    from reformer_dist import ReformerLM
    from reformer_dist.kernels import chunked_attention as dispatch

    calls = []
    for name, (fn, supports) in list(dispatch._BACKENDS.items()):
        spy = (lambda fn, name: lambda *a, **kw: calls.append(name) or fn(*a, **kw))(fn, name)
        monkeypatch.setitem(dispatch._BACKENDS, name, (spy, supports))
    cfg = load_run_config(
        None,
        [
            f"model.attention_backend={backend}",
            "model.vocab_size=40",
            "model.d_model=16",
            "model.n_heads=2",
            "model.d_head=8",
            "model.d_ff=32",
            "model.chunk_len=8",
            'model.attn_layers=["lsh","local"]',
            "model.axial_pos_shape=[4,8]",
            "data.seq_len=32",
        ],
    )
    ReformerLM(cfg.model)(torch.randint(0, 40, (1, 32)), torch.randint(0, 40, (1, 32)))
    assert calls and set(calls) == {backend}  # both layers, and nothing chosen behind the config's back
