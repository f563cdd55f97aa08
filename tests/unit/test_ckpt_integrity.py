"""Checksums of weights folders: a truncated or altered file is an error naming it, never a wrong model."""

from __future__ import annotations

import json

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.checkpoint.deepspeed_ckpt import verify_torch_file
from reformer_dist.checkpoint.writer import parse_size, write_weights_dir
from reformer_dist.cli.ckpt import main
from reformer_dist.ondisk import CHECKSUMS, CorruptCheckpointError, load_weights, verify_checksums

CFG = ReformerConfig(
    vocab_size=40,
    d_model=16,
    n_heads=2,
    d_head=8,
    d_ff=32,
    n_layers=2,
    attn_layers=["lsh", "local"],
    chunk_len=8,
    axial_pos_shape=[4, 8],
)


def _write(tmp_path, shard: str | int = "5GB"):
    torch.manual_seed(0)
    model = ReformerLM(CFG)
    files = write_weights_dir(tmp_path / "m", model.state_dict(), CFG.to_dict(), max_shard_size=shard)
    return model, files


def _flip(path, where: float = 0.7) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01  # past the header: inside tensor data
    path.write_bytes(bytes(data))


def test_intact_folder_verifies_and_loads(tmp_path):
    model, files = _write(tmp_path)
    assert verify_checksums(tmp_path / "m") is True
    body = json.loads((tmp_path / "m" / CHECKSUMS).read_text())
    assert sorted(body["files"]) == ["config.json", "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_raise_naming_the_file(tmp_path, capsys, damage):
    _, files = _write(tmp_path, shard=4096)  # several shards: damage the second
    assert len(files) > 2
    victim = files[1]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        _flip(victim)
    with pytest.raises(CorruptCheckpointError, match=str(victim)):
        ReformerLM.from_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    assert "FAILED" in json.loads(capsys.readouterr().out)["checksums"]
    # without the checksum file: truncation is still caught by safetensors, by name
    (tmp_path / "m" / CHECKSUMS).unlink()
    if damage == "truncate":
        with pytest.raises(CorruptCheckpointError, match=str(victim)):
            load_weights(tmp_path / "m")


def test_edited_config_and_missing_shard(tmp_path):
    _, files = _write(tmp_path, shard=4096)
    cfg_path = tmp_path / "m" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"chunk_len": 8', '"chunk_len": 16'))
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        ReformerLM.from_pretrained(tmp_path / "m")
    files[-1].unlink()
    with pytest.raises(CorruptCheckpointError, match=str(files[-1])):
        load_weights(tmp_path / "m", verify=False)


def test_torch_file_crc(tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"w": torch.randn(2000)}, p)
    verify_torch_file(p)
    _flip(p, 0.5)
    assert torch.load(p)["w"].shape == (2000,)  # torch.load itself accepts the flipped byte silently
    with pytest.raises(CorruptCheckpointError, match="CRC"):
        verify_torch_file(p)
    p.write_bytes(p.read_bytes()[:-500])
    with pytest.raises(CorruptCheckpointError, match=str(p)):
        verify_torch_file(p)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max shard size"):
        parse_size("lots")


@pytest.mark.slow
def test_console_script(tmp_path):
    """The installed `reformer-ckpt` entry point runs (pyproject [project.scripts])."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("reformer-ckpt")
    assert script.is_file(), f"{script}: console script not installed (pip install -e .)"
    _write(tmp_path)
    p = subprocess.run(
        [str(script), "inspect", str(tmp_path / "m"), "--json"], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["parameters"] == sum(v.numel() for v in ReformerLM(CFG).state_dict().values())
    assert (info["dtype"], info["checksums"]) == ("F32", "verified")
