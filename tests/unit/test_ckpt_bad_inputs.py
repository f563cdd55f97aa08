"""Bad-input sweep of `reformer-ckpt` and `reformer-launch hostfile` (issues #15, #17), in-process via main(argv).

Each case: a message naming the folder / file / field, exit 1 (corrupt or incomplete input) or 2
(usage, unsupported config), and nothing written or changed. One tiny training run (a subprocess)
provides the real DeepSpeed checkpoint the cases damage copies of. docs/troubleshooting.md lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.cli.ckpt import main
from reformer_dist.cli.launch import main as launch_main
from reformer_dist.ondisk import CorruptCheckpointError
from tests.distributed.train_launcher import TINY, clean_env
from tests.unit.cli_cases import run_cli, snapshot

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(main, capsys, *argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """<run>/checkpoints with one complete checkpoint (step 2) and <run>/model, from a real tiny run."""
    out = tmp_path_factory.mktemp("trained") / "run"
    args = [sys.executable, "-m", "reformer_dist.cli.train", "--set", f"output.dir={out}"]
    for o in [*TINY, "train.max_steps=2", "checkpoint.at_end=true", "output.save_model=true"]:
        args += ["--set", o]
    p = subprocess.run(args, cwd=out.parent, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert (out / "checkpoints" / "latest").is_file(), p.stderr[-3000:]
    return out


@pytest.fixture
def ckpts(trained, tmp_path) -> Path:
    """A private copy of the checkpoint root, to damage."""
    return Path(shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints"))


def _optim_file(root: Path) -> Path:
    return next((root / "step_00000002").glob("*optim_states.pt"))


# ---------------------------------------------------------------------------------- consolidate / inspect / reshard
def test_missing_and_not_a_checkpoint_folders(tmp_path, capsys):
    code, _, err = run(capsys, "consolidate", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and f"{tmp_path / 'nope'}: no such checkpoint folder" in err
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    for cmd in (
        ["consolidate", tmp_path / "stuff", "--out", tmp_path / "o"],
        ["inspect", tmp_path / "stuff"],
        ["reshard", tmp_path / "stuff", "--out", tmp_path / "o"],
    ):
        code, _, err = run(capsys, *cmd)
        assert code == 2 and f"{tmp_path / 'stuff'}: not a DeepSpeed checkpoint tag folder and no 'latest' file" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_truncated_optimizer_file_is_named_by_consolidate_and_inspect(ckpts, tmp_path, capsys):
    victim = _optim_file(ckpts)
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    code, _, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "o")
    assert code == 1 and f"{victim}: truncated or altered ({size // 2} bytes, MANIFEST.json says {size})" in err, err
    code, _, err = run(capsys, "inspect", ckpts)
    assert code == 1 and f"{victim}: truncated or altered ({size // 2} bytes, MANIFEST.json says {size})" in err, err
    assert "Errno 22" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_truncated_file_without_a_manifest_is_named_by_inspect(ckpts, capsys):
    (ckpts / "step_00000002" / "MANIFEST.json").unlink()  # a plain DeepSpeed save
    victim = ckpts / "step_00000002" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-500])
    code, _, err = run(capsys, "inspect", ckpts)
    assert code == 1 and f"{victim}: truncated or corrupt" in err, err


@pytest.mark.slow
def test_altered_manifest_entries_latest_and_tag_are_named(ckpts, tmp_path, capsys):
    # #26: a string size compared unequal ("truncated or altered"), a missing sha256 was a KeyError traceback,
    # `latest` or --tag holding a path read a folder outside the checkpoint root
    manifest = ckpts / "step_00000002" / "MANIFEST.json"
    good = manifest.read_text()
    name = "mp_rank_00_model_states.pt"
    for edit, says in (
        (lambda e: e.update(size=str(e["size"])), f"files['{name}'].size: expected an integer >= 0"),
        (lambda e: e.pop("sha256"), f"files['{name}'].sha256: expected 64 lowercase hex digits, got None"),
    ):
        body = json.loads(good)
        edit(body["files"][name])
        manifest.write_text(json.dumps(body))
        code, _, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "o")
        assert code == 1 and f"{manifest}: {says}" in err and "Traceback" not in err, err
    body = json.loads(good)
    body["files"]["../../elsewhere"] = body["files"].pop(name)
    manifest.write_text(json.dumps(body))
    code, _, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "o")
    assert code == 1 and f"{manifest}: files['../../elsewhere']: expected a path inside" in err, err
    manifest.write_text(good)

    (ckpts / "latest").write_text("../../etc")
    code, _, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "o")
    assert (
        code == 1
        and f"{ckpts / 'latest'}: expected the name of a tag folder in {ckpts}, got '../../etc'; "
        "pass --tag (tags here: ['step_00000002'])"
        in err
    ), err
    code, _, err = run(capsys, "consolidate", ckpts, "--tag", "../checkpoints/step_00000002", "--out", tmp_path / "o")
    assert code == 2 and "--tag '../checkpoints/step_00000002': expected the name of a tag folder in" in err, err
    assert not (tmp_path / "o").exists()


def test_bad_max_shard_size_fails_before_reading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("reformer_dist.checkpoint.consolidate.consolidate", lambda *a, **k: pytest.fail("ran"))
    for cmd in ("consolidate", "export-hf", "import-hf"):
        code, _, err = run(capsys, cmd, tmp_path / "nope", "--out", tmp_path / "o", "--max-shard-size", "5 gigs")
        assert code == 2 and "argument --max-shard-size: cannot parse '5 gigs' (examples: 5GB" in err, err


@pytest.mark.slow
def test_out_not_empty_is_refused_and_left_alone(ckpts, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "o")
    assert code == 2 and f"{tmp_path / 'o'}: exists and is not empty (pass --overwrite to replace it)" in err
    assert snapshot(tmp_path / "o") == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


@pytest.mark.slow
def test_reshard_workers_are_bounded(ckpts, tmp_path, capsys):
    # #26: --workers 0 or 100000 reached DeepSpeed's process pool
    for value in ("0", "100000"):
        code, _, err = run(capsys, "reshard", ckpts, "--out", tmp_path / "u", "--workers", value)
        assert code == 2 and "argument --workers: expected an integer in 1.." in err and f"got '{value}'" in err, err
    assert not (tmp_path / "u").exists()


@pytest.mark.slow
def test_unsupported_reshard_transition(ckpts, tmp_path, capsys):
    code, _, err = run(capsys, "reshard", ckpts, "--out", tmp_path / "u", "--to-stage", "3")
    assert code == 2 and "--to-stage 3: a ZeRO-1 checkpoint loaded as ZeRO-3" in err
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
@pytest.mark.slow
def test_written_folders_follow_the_umask(ckpts, trained, tmp_path, capsys, umask):
    # #17: consolidate / export-hf / import-hf made 0700 folders and 0600 safetensors
    old = os.umask(umask)
    try:
        assert run(capsys, "consolidate", ckpts, "--out", tmp_path / "c")[0] == 0
        assert run(capsys, "export-hf", trained / "model", "--out", tmp_path / "hf")[0] == 0
        assert run(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "back")[0] == 0
    finally:
        os.umask(old)
    for d in ("c", "hf", "back"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o777 & ~umask, d
        for f in (tmp_path / d).iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


@pytest.mark.parametrize(
    "cmd, src, out, rel",
    [
        ("consolidate", "checkpoints", "checkpoints", "is the input folder checkpoints"),
        ("consolidate", "checkpoints", "checkpoints/step_00000002", "is inside the input folder checkpoints"),
        (
            "consolidate",
            "checkpoints/step_00000002",
            "checkpoints",
            "contains the input folder checkpoints/step_00000002",
        ),
        ("consolidate", "checkpoints/step_00000002", "checkpoints/weights", "is inside the input folder checkpoints"),
        ("reshard", "checkpoints", ".", "contains the input folder checkpoints"),
        ("export-hf", "model", "model", "is the input folder model"),
        ("import-hf", "model", "model/hf", "is inside the input folder model"),
    ],
    ids=[
        "consolidate-same",
        "consolidate-into-a-tag",
        "consolidate-over-the-root",
        "consolidate-beside-the-tags",
        "reshard-over-the-run",
        "export-same",
        "import-inside",
    ],
)
@pytest.mark.slow
def test_out_overlapping_an_input_is_refused_even_with_overwrite(
    trained, tmp_path, capsys, monkeypatch, cmd, src, out, rel
):
    # #26: `consolidate CK --out CK --overwrite` deleted every checkpoint; reshard replaced the run folder
    run_dir = Path(shutil.copytree(trained, tmp_path / "run"))
    monkeypatch.chdir(run_dir)
    before = snapshot(run_dir)
    code, _, err = run(capsys, cmd, src, "--out", out, "--overwrite")
    assert (
        code == 2
        and f"--out {out} {rel}: writing there would replace or delete the input it is read from; "
        "choose a folder outside it"
        in err
    ), err
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in trained.iterdir())  # no temp folder


@pytest.mark.slow
def test_trained_model_folder_is_checksummed_and_a_flipped_byte_is_caught(trained, tmp_path, capsys):
    # #26: reformer-train's model/ had no checksums.json (a flipped byte loaded and exported) and a 0600 file
    model = Path(shutil.copytree(trained / "model", tmp_path / "model"))
    assert sorted(p.name for p in model.iterdir()) == [
        "checksums.json",
        "config.json",
        "model.safetensors",
        "training_data.json",
    ]  # + the tokenizer record (#22)
    mask = os.umask(0o022)
    os.umask(mask)  # the training subprocess ran with this process's umask
    for f in (trained / "model").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
    victim = model / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: safetensors alone would load it
    victim.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=f"{victim}: corrupt \\(SHA-256 differs from"):
        ReformerLM.from_pretrained(model)
    code, _, err = run(capsys, "export-hf", model, "--out", tmp_path / "hf")
    assert code == 1 and f"{victim}: corrupt (SHA-256 differs from {model / 'checksums.json'})" in err, err
    assert snapshot(tmp_path) == before


def test_save_pretrained_into_a_used_folder_keeps_other_files(tmp_path):
    cfg = ReformerConfig(
        vocab_size=53,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_ff=48,
        n_layers=2,
        attn_layers=["lsh", "local"],
        axial_pos_shape=[8, 8],
    )
    d = tmp_path / "m"
    ReformerLM(cfg).save_pretrained(d, max_shard_size=20000)  # sharded: index + shards
    assert (d / "model.safetensors.index.json").is_file()
    (d / "notes.txt").write_text("mine")
    torch.manual_seed(1)
    again = ReformerLM(cfg)
    again.save_pretrained(d)  # one file now: the earlier shards and index go, the notes stay
    assert sorted(p.name for p in d.iterdir()) == ["checksums.json", "config.json", "model.safetensors", "notes.txt"]
    loaded = ReformerLM.from_pretrained(d)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))


# ---------------------------------------------------------------------------------- HF conversion
@pytest.mark.slow
def test_export_loads_in_transformers_without_missing_keys(trained, tmp_path, capsys):
    import transformers

    assert run(capsys, "export-hf", trained / "model", "--out", tmp_path / "hf")[0] == 0
    model, info = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert {k: set(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
    }, info
    assert not info["error_msgs"]
    assert torch.count_nonzero(model.lm_head.decoder.bias) == 0  # ours has no head bias: zeros, as loaded


@pytest.mark.parametrize(
    "change, field",
    [({"causal": False}, "ReformerConfig.causal"), ({"attn_layers": ["full", "lsh"]}, "ReformerConfig.attn_layers")],
    ids=["not-causal", "full-attention-layer"],
)
def test_export_refuses_configs_hf_cannot_hold(tmp_path, capsys, change, field):
    cfg = ReformerConfig(
        **{
            **dict(
                vocab_size=53,
                d_model=32,
                n_heads=2,
                d_head=16,
                d_ff=48,
                n_layers=2,
                attn_layers=["lsh", "local"],
                axial_pos_shape=[8, 8],
            ),
            **change,
        }
    )
    ReformerLM(cfg).save_pretrained(tmp_path / "ours")
    code, _, err = run(capsys, "export-hf", tmp_path / "ours", "--out", tmp_path / "hf")
    assert code == 2 and f"{field} = " in err and "cannot be exported to Hugging Face transformers" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_export_of_a_model_trained_with_document_masks_is_refused_unless_accepted(tmp_path, capsys):
    # #26: export-hf dropped data.document_masking / reset_positions without a word; config.json had no trace
    out = tmp_path / "run"
    args = [sys.executable, "-m", "reformer_dist.cli.train", "--set", f"output.dir={out}"]
    for o in [
        *TINY,
        "train.max_steps=1",
        "checkpoint.at_end=true",
        "output.save_model=true",
        "data.document_masking=true",
        "data.reset_positions=true",
    ]:
        args += ["--set", o]
    p = subprocess.run(args, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    trained = {"document_masking": True, "reset_positions": True}
    assert json.loads((out / "model" / "config.json").read_text())["trained_with"] == trained
    assert run(capsys, "consolidate", out / "checkpoints", "--out", tmp_path / "c")[0] == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["trained_with"] == trained
    ReformerLM.from_pretrained(tmp_path / "c")  # the key does not disturb loading

    before = snapshot(tmp_path)
    code, _, err = run(capsys, "export-hf", out / "model", "--out", tmp_path / "hf")
    assert (
        code == 2
        and f"{out / 'model' / 'config.json'}: the model was trained with data.document_masking = true "
        "and data.reset_positions = true (trained_with in config.json)"
        in err
    ), err
    assert "Pass --accept-document-masking to export anyway" in err
    assert snapshot(tmp_path) == before
    code, _, err = run(capsys, "export-hf", out / "model", "--out", tmp_path / "hf", "--accept-document-masking")
    assert code == 0 and "warning:" in err and "exported anyway (--accept-document-masking)" in err, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["reformer_dist"]["trained_with"] == trained
    assert run(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "back")[0] == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["trained_with"] == trained


def test_export_and_import_of_folders_that_are_not_models(tmp_path, capsys):
    code, _, err = run(capsys, "export-hf", tmp_path / "nope", "--out", tmp_path / "hf")
    assert code == 2 and f"{tmp_path / 'nope' / 'config.json'}: missing; expected a weights folder" in err
    (tmp_path / "notes").mkdir()
    code, _, err = run(capsys, "import-hf", tmp_path / "notes", "--out", tmp_path / "ours")
    assert code == 2 and f"{tmp_path / 'notes' / 'config.json'}: missing; expected a Hugging Face model folder" in err
    (tmp_path / "notes" / "config.json").write_text("{oops")
    code, _, err = run(capsys, "import-hf", tmp_path / "notes", "--out", tmp_path / "ours")
    assert code == 2 and f"{tmp_path / 'notes' / 'config.json'}: not valid JSON" in err
    (tmp_path / "notes" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run(capsys, "import-hf", tmp_path / "notes", "--out", tmp_path / "ours")
    assert code == 2 and "model_type = 'bert': not a Reformer config" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ours").exists()


@pytest.mark.slow
def test_import_of_a_truncated_safetensors(trained, tmp_path, capsys):
    assert run(capsys, "export-hf", trained / "model", "--out", tmp_path / "hf")[0] == 0
    (tmp_path / "hf" / "checksums.json").unlink()  # as a folder from the Hub would be: no checksums
    victim = tmp_path / "hf" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-64])
    code, _, err = run(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "ours")
    assert code == 1 and f"{victim}: cannot read safetensors file (truncated or corrupt?)" in err
    assert not (tmp_path / "ours").exists()


# ---------------------------------------------------------------------------------- launch
def test_hostfile_error_names_the_option_that_was_given(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    assert launch_main(["hostfile", "--nodelist", "node[01-"]) == 2
    err = capsys.readouterr().err
    assert "--nodelist: unmatched '[' in 'node[01-'" in err and "SLURM_JOB_NODELIST" not in err
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[03-01]")
    assert launch_main(["hostfile"]) == 2
    assert "SLURM_JOB_NODELIST: descending range '03-01'" in capsys.readouterr().err


def test_huge_node_list_is_refused_before_expanding_and_long_lists_are_deduplicated(capsys, tmp_path):
    # #26: node[01-1000000] ran for minutes with no output (quadratic de-duplication)
    for nodelist in ("node[01-1000000]", "rack[1-300]-n[1-300]", "a[1-40000],b[1-40000]"):
        assert launch_main(["hostfile", "--nodelist", nodelist]) == 2
        err = capsys.readouterr().err
        assert (
            f"reformer-launch hostfile: error: --nodelist: '{nodelist}' names more than 65536 hosts "
            "(SLURM allocates at most 65533 nodes): a typo in a range?" in err
        ), err
    assert launch_main(["hostfile", "--nodelist", "n[1-60000],n[2-3],m1", "--out", str(tmp_path / "hosts")]) == 0
    lines = (tmp_path / "hosts").read_text().splitlines()
    assert len(lines) == 60001 and lines[:2] == ["n1 slots=1", "n2 slots=1"] and lines[-1] == "m1 slots=1"
    assert launch_main(["hostfile", "--nodelist", "n1", "--slots", "0"]) == 2
    assert "--slots: expected an integer >= 1, got 0" in capsys.readouterr().err


def _rotate(root: Path, old: str = "step_00000002", new: str = "step_00000003") -> None:
    """What a live run's save + rotation (keep_last = 1) does to the root: a newer tag, `latest`, old one gone."""
    shutil.copytree(root / old, root / new)
    (root / "latest").write_text(new)
    shutil.rmtree(root / old)


@pytest.mark.slow
def test_consolidate_while_a_run_rotates_the_folder(ckpts, tmp_path, capsys, monkeypatch):
    # #26: consolidate failed with raw errno text (once an IndexError) when the run deleted the tag it read
    import reformer_dist.checkpoint.consolidate as consolidate_module

    real_verify = consolidate_module.verify_files
    calls = []

    def rotating_verify(path, *a, **k):  # the run rotates right after consolidate resolved `latest`
        if not calls:
            _rotate(ckpts)
        calls.append(path)
        return real_verify(path, *a, **k)

    monkeypatch.setattr(consolidate_module, "verify_files", rotating_verify)
    code, out, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "pinned")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 2 and summary["source"] == str(ckpts / "step_00000002")  # the pinned one, whole
    assert ReformerLM.from_pretrained(tmp_path / "pinned") is not None
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) == []  # the pin is released

    # where no hard link can be made (another file system), the vanished checkpoint is named, with the cause
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    calls.clear()
    monkeypatch.setattr(
        consolidate_module,
        "verify_files",
        lambda path, *a, **k: (_rotate(ckpts, "step_00000003", "step_00000004"), real_verify(path))[1],
    )
    code, _, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "in-place")
    assert code == 1, err
    assert (
        f"{ckpts / 'step_00000003'}: deleted while being read: a run is rotating the checkpoints in {ckpts} "
        "(checkpoint.keep_last). Pass --tag step_00000004 (the newest now) and run again, or stop the run "
        "first" in err
    ), err
    assert "Traceback" not in err and "Errno" not in err
    assert not (tmp_path / "in-place").exists()


@pytest.mark.slow
def test_inspect_while_a_run_rotates_the_folder(ckpts, capsys, monkeypatch):
    import reformer_dist.checkpoint.inspect as inspect_module

    real_describe = inspect_module.describe

    def rotating_describe(ref):  # the run deletes the tag right after inspect resolved `latest`
        _rotate(ckpts)
        return real_describe(ref)

    monkeypatch.setattr(inspect_module, "describe", rotating_describe)
    code, _, err = run(capsys, "inspect", ckpts)
    assert (
        code == 1
        and f"{ckpts / 'step_00000002'}: deleted while being read: a run is rotating the checkpoints "
        f"in {ckpts} (checkpoint.keep_last). Pass --tag step_00000003 (the newest now)"
        in err
    ), err
    assert "Traceback" not in err and "IndexError" not in err


@pytest.mark.slow
def test_consolidate_follows_latest_that_moves_before_the_pin(ckpts, tmp_path, capsys, monkeypatch):
    import reformer_dist.checkpoint.deepspeed_ckpt as ds_ckpt

    real_link_tree = ds_ckpt._link_tree
    rotated = []

    def link_tree(src, dst):  # the run deletes the tag while it is being pinned
        if not rotated:
            rotated.append(src.name)
            _rotate(src.parent, src.name, f"step_{int(src.name[5:]) + 1:08d}")
        return real_link_tree(src, dst)

    monkeypatch.setattr(ds_ckpt, "_link_tree", link_tree)
    code, out, err = run(capsys, "consolidate", ckpts, "--out", tmp_path / "o")
    assert code == 0 and json.loads(out)["step"] == 2 and rotated == ["step_00000002"], err  # the copy's step
    assert json.loads(out)["source"] == str(ckpts / "step_00000003")
    rotated.clear()
    code, _, err = run(capsys, "consolidate", ckpts, "--tag", "step_00000003", "--out", tmp_path / "o2")
    assert code == 1 and f"{ckpts / 'step_00000003'}: deleted while being read" in err, err
    assert "Pass --tag step_00000004 (the newest now)" in err and not (tmp_path / "o2").exists()


def test_slots_from_the_environment_are_named(capsys, monkeypatch):
    # #26: SLURM_GPUS_ON_NODE=0 was reported as "--slots", "abc" as an exit-1 SystemExit
    for value in ("0", "abc"):
        monkeypatch.setenv("SLURM_GPUS_ON_NODE", value)
        assert launch_main(["hostfile", "--nodelist", "n1"]) == 2
        assert (
            f"SLURM_GPUS_ON_NODE={value!r}: expected an integer >= 1 (slots per node); pass --slots"
            in capsys.readouterr().err
        )
