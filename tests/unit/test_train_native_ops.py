"""DeepSpeed's JIT-built C++ ops: a training start builds none, so a second start rebuilds nothing (issue #15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reformer_dist.training import native_ops
from tests.distributed.train_launcher import TINY, clean_env

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.slow
def test_two_fresh_starts_with_either_ninja_build_nothing(tmp_path: Path):
    # The two kinds of process of the old rebuild loop: venv bin first on PATH (activated venv, launch
    # scripts: pip's ninja 1.13) and without it (.venv/bin/reformer-train from make: /usr/bin/ninja).
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    plain_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    snapshots, outputs = [], []
    for i, path in enumerate((os.pathsep.join([venv_bin, plain_path]), plain_path)):
        args = [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--set",
            f"output.dir={tmp_path / f'run{i}'}",
            "--set",
            "train.max_steps=2",
        ]
        for o in TINY:
            args += ["--set", o]
        env = {**clean_env(), "TORCH_EXTENSIONS_DIR": str(ext), "PATH": path}
        p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        outputs.append(p.stdout + p.stderr)
        assert (tmp_path / f"run{i}" / "ranks" / "rank0.jsonl").is_file(), outputs[-1][-3000:]
        assert '"event": "end"' in (tmp_path / f"run{i}" / "ranks" / "rank0.jsonl").read_text(), outputs[-1][-3000:]
        snapshots.append(_tree(ext))
    assert snapshots[0] == snapshots[1] == {}, snapshots  # nothing built, so nothing can be rebuilt
    for out in outputs:
        assert native_ops.SHM_COMM not in out and "building DeepSpeed" not in out, out[-3000:]


def test_prefer_interpreter_ninja_puts_the_venv_first(monkeypatch, tmp_path: Path):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    env = {"PATH": f"/usr/local/bin{os.pathsep}/usr/bin"}
    assert not native_ops.prefer_interpreter_ninja(env)  # no ninja next to the interpreter: PATH untouched
    assert env["PATH"] == f"/usr/local/bin{os.pathsep}/usr/bin"
    (bindir / "ninja").write_text("#!/bin/sh\n")
    (bindir / "ninja").chmod(0o755)
    env = {"PATH": f"/usr/bin{os.pathsep}{bindir}"}
    assert native_ops.prefer_interpreter_ninja(env)
    assert env["PATH"] == f"{bindir}{os.pathsep}/usr/bin"  # moved to the front, not duplicated
    assert not native_ops.prefer_interpreter_ninja(env)


def test_announce_build_prints_once_per_missing_op(monkeypatch, tmp_path: Path, capsys, console):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert native_ops.announce_build("cpu_adam", "optimizer offload")
    err = capsys.readouterr().err
    assert "building DeepSpeed's C++ op cpu_adam (optimizer offload)" in err and str(tmp_path / "cpu_adam") in err
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert not native_ops.announce_build("cpu_adam", "optimizer offload")
    assert capsys.readouterr().err == ""


def test_make_starts_processes_with_the_venv_first_on_path():
    # make quickstart / make test: every process (and the ninja torch runs) comes from the venv
    p = subprocess.run(
        ["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show-path"],
        cwd=REPO,
        input='show-path:\n\t@echo "$$PATH"\n',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split(os.pathsep)[0] == str(REPO / ".venv" / "bin"), p.stdout


def test_announce_build_warns_about_an_old_lock(monkeypatch, tmp_path: Path, capsys, console):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "cpu_adam").mkdir()
    lock = tmp_path / "cpu_adam" / "lock"
    lock.write_text("")
    native_ops.announce_build("cpu_adam", "offload")
    assert "warning" not in capsys.readouterr().err  # a build may be running right now
    os.utime(lock, (0, os.stat(lock).st_mtime - 3600))
    native_ops.announce_build("cpu_adam", "offload")
    assert f"reformer-train: warning: {lock} is 60 min old" in capsys.readouterr().err
