"""Checkpoint manifest, --resume resolution and pruning (plain files, no process group)."""

from __future__ import annotations

import json

import pytest

from reformer_dist import ondisk
from reformer_dist.ondisk import CheckpointError, verify_manifest
from reformer_dist.training import checkpointing as ckpt, resume, seeding
from reformer_dist.training.metrics import read_records
from reformer_dist.training.train_state import TrainState
from tests.unit.cli_cases import snapshot


def fake_checkpoint(root, step, complete=True):
    d = root / ondisk.tag_for(step)
    (d / "trainer_state").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100 + bytes([step % 256]))
    (d / "trainer_state" / "rank00000.pt").write_bytes(b"state")
    if complete:
        ckpt.commit(root, d.name, extra={"step": step})
    return d


def test_auto_picks_the_newest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 100)
    fake_checkpoint(tmp_path, 200)
    fake_checkpoint(tmp_path, 300, complete=False)  # a save that never finished
    point = resume.find_resume("auto", tmp_path)
    assert (point.step, point.tag, point.skipped_incomplete) == (200, "step_00000200", ["step_00000300"])
    assert (tmp_path / "latest").read_text() == "step_00000200"


def test_auto_without_checkpoints_starts_fresh_but_a_path_must_exist(tmp_path):
    assert resume.find_resume("auto", tmp_path / "none") is None
    with pytest.raises(CheckpointError, match="no such file"):
        resume.find_resume(str(tmp_path / "none"), tmp_path)
    fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(CheckpointError, match="step_00000005: incomplete checkpoint"):
        resume.find_resume(str(tmp_path / "step_00000005"), tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resume.find_resume(str(tmp_path), tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupt_checkpoint_names_the_file(tmp_path, damage):
    d = fake_checkpoint(tmp_path, 100)
    f = d / "mp_rank_00_model_states.pt"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=f"{f}: (corrupt|truncated or altered|missing)"):
        resume.find_resume("auto", tmp_path)  # never silently falls back to an older checkpoint
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        verify_manifest(d)


def test_prune_keeps_the_newest_complete_and_drops_stale_partials(tmp_path):
    for s in (100, 200, 300):
        fake_checkpoint(tmp_path, s)
    fake_checkpoint(tmp_path, 150, complete=False)  # an old interrupted save
    fake_checkpoint(tmp_path, 400, complete=False)  # being written right now: must survive
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000100", "step_00000150"]
    assert [p.name for _, p in ckpt.list_tags(tmp_path)] == ["step_00000400", "step_00000300", "step_00000200"]


def test_rotation_keeps_the_last_tested_checkpoint_until_the_newest_gives_a_finite_loss(tmp_path):
    # #26: keep_last = 1 deleted the last good checkpoint the moment a (poisoned) newer one was committed
    for s in (1, 2, 3):
        fake_checkpoint(tmp_path, s)
    assert [p.name for p in ckpt.prune(tmp_path, keep_last=1)] == ["step_00000001"]
    assert [p.name for _, p in ckpt.list_tags(tmp_path)] == ["step_00000003", "step_00000002"]
    assert [p.name for p in ckpt.prune(tmp_path, keep_last=1, newest_tested=True)] == ["step_00000002"]


def test_roll_back_after_divergence_moves_the_poisoned_checkpoint_aside(tmp_path):
    for s in (2, 3):
        fake_checkpoint(tmp_path, s)
    before = snapshot(tmp_path / "step_00000002")
    good, moved = resume.roll_back_to_finite(tmp_path, last_finite=3)
    assert good == 2 and (tmp_path / "latest").read_text() == "step_00000002"
    assert [p.name for p in moved.iterdir()] == ["step_00000003"] and moved.parent == tmp_path
    assert snapshot(tmp_path / "step_00000002") == before
    good, moved = resume.roll_back_to_finite(tmp_path, last_finite=2)  # nothing good left: no `latest`
    assert good is None and not (tmp_path / "latest").exists() and not ckpt.list_tags(tmp_path)


def test_rank_state_round_trip_and_missing_rank(tmp_path):
    ckpt.save_rank_state(tmp_path, 0, {"step": 3, "rng": seeding.capture_rng()})
    assert ckpt.load_rank_state(tmp_path, 0)["step"] == 3
    with pytest.raises(CheckpointError, match=r"rank00001.pt: missing; the checkpoint holds trainer state for 1 rank"):
        ckpt.load_rank_state(tmp_path, 1)


def test_run_config_comparison_names_keys():
    saved = {
        "config": {"model": {"d_model": 64}, "train": {"lr": 1e-3, "max_steps": 10}},
        "plan": {"dp_size": 2, "sp_size": 1, "micro_batch": 1, "grad_accum": 1},
    }
    now = {
        "config": {"model": {"d_model": 128}, "train": {"lr": 2e-3, "max_steps": 20}},
        "plan": {"dp_size": 4, "sp_size": 1, "micro_batch": 1, "grad_accum": 1},
    }
    errors, warnings = resume.compare_run_configs(saved, now)
    assert errors[0].startswith("model.d_model: checkpoint has 64, this run 128")
    assert any(e.startswith("batch plan dp_size") for e in errors)
    assert warnings == ["train.lr: checkpoint has 0.001, this run 0.002"]  # max_steps may change silently


def test_metrics_reader_drops_records_superseded_by_a_resume(tmp_path):
    recs = [{"event": "start", "resume_step": None}]
    recs += [{"event": "step", "step": s, "loss": 10 - s} for s in (1, 2, 3, 4)]
    recs += [{"event": "start", "resume_step": 2}, {"event": "step", "step": 3, "loss": 0.5}]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"event": "st')  # torn last line
    steps = [(r["step"], r["loss"]) for r in read_records(p) if r["event"] == "step"]
    assert steps == [(1, 9), (2, 8), (3, 0.5)]


def test_metrics_with_a_cut_last_line_are_repaired_on_open_and_plot_says_so(tmp_path, capsys, console):
    # #26: a resumed run appended its start record to the line a power loss cut; reformer-plot then
    # silently dropped both (and with the start record, the resume's supersession)
    from reformer_dist.cli.plot import main as plot
    from reformer_dist.training.metrics import Metrics

    recs = [{"event": "start", "resume_step": None}] + [{"event": "step", "step": s, "loss": 10 - s} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    cut = "\n".join(json.dumps(r) for r in recs) + '\n{"event": "step", "step": 4, "lo'
    path.write_text(cut)
    m = Metrics(tmp_path, 0, 1, 10, 2, tensorboard=False, progress_bar=False, rank_files=False, log_every=1)
    m.event("start", resume_step=2)
    m.step({"step": 3, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 1.0, "mem_gb": 0.0})
    m.close()
    err = capsys.readouterr().err
    assert f"reformer-train: warning: {path}: its last line was cut (a crash or power loss during a write)" in err
    assert path.read_text().startswith(cut + "\n")  # the cut bytes kept, the new records on their own lines
    problems = []
    steps = [(r["step"], r["loss"]) for r in read_records(path, problems) if r["event"] == "step"]
    assert steps == [(1, 9), (2, 8), (3, 0.5)]
    assert problems == [
        f'{path}:5: not a JSON record (cut by a crash or power loss?): skipped: \'{{"event": "step", "step": 4, "lo\''
    ]
    assert plot([str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0
    assert f"reformer-plot: warning: {path}:5: not a JSON record" in capsys.readouterr().err

    # a file written before this fix: the start record glued to the cut line is recovered, and said so
    glued = tmp_path / "old.jsonl"
    glued.write_text(
        cut
        + json.dumps({"event": "start", "resume_step": 2})
        + "\n"
        + json.dumps({"event": "step", "step": 3, "loss": 0.5})
        + "\n"
    )
    problems = []
    steps = [(r["step"], r["loss"]) for r in read_records(glued, problems) if r["event"] == "step"]
    assert steps == [(1, 9), (2, 8), (3, 0.5)]
    assert "its complete record after the cut one is kept" in problems[0] and problems[0].startswith(f"{glued}:5:")


def test_plot_writes_a_png(tmp_path):
    from reformer_dist.cli.plot import main

    recs = [{"event": "start", "resume_step": None, "tokens_per_step": 64}]
    recs += [{"event": "step", "step": s, "loss": 5.0 / s} for s in range(1, 21)]
    recs += [{"event": "eval", "step": 10, "eval_loss": 1.0, "unigram_loss": 3.0}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "loss.png"
    assert main([str(run), "--out", str(out), "--smooth", "3", "--x", "tokens"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as e:  # #26: --smooth 0 or -3 was taken as "no smoothing"
        main([str(run), "--out", str(out), "--smooth", "0"])
    assert e.value.code == 2


def test_universal_comparison_needs_the_global_batch_not_the_layout():
    # a reshard output resumes on another world size: DP layout may change, global batch and SP size may not
    saved = {
        "config": {"model": {"d_model": 64}},
        "plan": {"dp_size": 2, "sp_size": 1, "micro_batch": 1, "grad_accum": 2, "global_batch": 4},
    }
    other_layout = {
        "config": {"model": {"d_model": 64}},
        "plan": {"dp_size": 4, "sp_size": 1, "micro_batch": 1, "grad_accum": 1, "global_batch": 4},
    }
    assert resume.compare_run_configs(saved, other_layout, universal=True) == ([], [])
    assert resume.compare_run_configs(saved, other_layout)[0]  # an exact resume refuses the same change
    changed = {
        "config": {"model": {"d_model": 128}},
        "plan": {"dp_size": 2, "sp_size": 2, "micro_batch": 1, "grad_accum": 4, "global_batch": 8},
    }
    errors, _ = resume.compare_run_configs(saved, changed, universal=True)
    assert errors == [
        "model.d_model: checkpoint has 64, this run 128",
        "batch plan global_batch: checkpoint has 4, this run 8 (set train.global_batch to keep the same data order)",
        "parallel.sequence_parallel_size must stay the same across a reshard",
    ]


def test_explicit_resume_moves_the_runs_newer_checkpoints_aside(tmp_path):
    # --resume PATH of an older checkpoint (here another run's): the newer checkpoints of THIS run's root go
    # to abandoned-<time>/, so that --resume auto never returns to them; the source root is left alone
    run_root, other = tmp_path / "run", tmp_path / "other"
    for step in (1, 2, 3):
        fake_checkpoint(run_root, step)
    source = fake_checkpoint(other, 2)
    fake_checkpoint(other, 5)
    record = {
        "config": {"model": {"d_model": 64}},
        "plan": {"dp_size": 1, "sp_size": 1, "micro_batch": 1, "grad_accum": 1},
        "world_size": 1,
    }
    (source / ondisk.RUN_CONFIG).write_text(json.dumps(record))
    saved = TrainState(step=2, tokens_seen=40, nonfinite_total=1, unigram_loss=3.5)
    ckpt.save_rank_state(
        source, 0, {**saved.state_dict(), "world_size": 1, "loader": {"position": 7}, "rng": seeding.capture_rng()}
    )

    class Engine:
        def load_checkpoint(self, root, tag, **_):
            self.loaded = (root, tag)
            return root, {}

    class Loader:
        def load_state_dict(self, state):
            self.state = state

    engine, loader, train = Engine(), Loader(), TrainState()
    point = resume.ResumePoint(other, source.name, 2, [])
    resume.load(point, engine, loader, train, record, rank=0, world_size=1, seed=0, abandon_newer_in=run_root)
    assert train == saved and loader.state == {"position": 7} and engine.loaded == (str(other), source.name)
    assert [p.name for _, p in ckpt.list_tags(run_root)] == ["step_00000002", "step_00000001"]
    (aside,) = run_root.glob("abandoned-*")
    assert [p.name for p in aside.iterdir()] == ["step_00000003"]
    assert [p.name for _, p in ckpt.list_tags(other)] == ["step_00000005", "step_00000002"]

    # --resume auto (abandon_newer_in=None) moves nothing
    fake_checkpoint(run_root, 4)
    resume.load(point, engine, loader, TrainState(), record, rank=0, world_size=1, seed=0, abandon_newer_in=None)
    assert [p.name for _, p in ckpt.list_tags(run_root)][0] == "step_00000004"
