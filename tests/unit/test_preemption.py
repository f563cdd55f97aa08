"""PreemptionHandler (signals -> flag, sync) and requeue_slurm_job with a stand-in scontrol."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from reformer_dist.training.preemption import PreemptionHandler, requeue_slurm_job, should_requeue


def _deliver(sig: int) -> None:
    """Send a signal to ourselves and give the interpreter a moment to run the Python handler."""
    os.kill(os.getpid(), sig)
    for _ in range(100):
        time.sleep(0.001)


def test_sigusr1_sets_flag_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler().install()
    try:
        assert not handler.requested and handler.signum is None
        _deliver(signal.SIGUSR1)
        assert handler.requested
        assert handler.signal_name == "SIGUSR1"
        assert handler.sync() is True  # no process group: the local flag
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_sigterm_is_caught_too() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGTERM) != before
        _deliver(signal.SIGTERM)
        assert handler.requested and handler.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_configurable_signals() -> None:
    seen: list[int] = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with PreemptionHandler(signals=[signal.SIGUSR2]) as handler:
            _deliver(signal.SIGUSR1)  # not ours: the previous handler still gets it
            assert seen == [signal.SIGUSR1] and not handler.requested
            _deliver(signal.SIGUSR2)
            assert handler.requested and handler.signal_name == "SIGUSR2"
    finally:
        signal.signal(signal.SIGUSR1, prev)


def test_sync_without_distributed_is_local_flag() -> None:
    handler = PreemptionHandler()  # not even installed
    assert handler.sync() is False
    handler.request()
    assert handler.requested and handler.sync() is True


def test_sync_with_single_rank_gloo_group(tmp_path: Path) -> None:
    """The collective path (all_reduce MAX on a CPU tensor) on a one-rank gloo group."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.fail("a process group leaked into this test from elsewhere")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        handler = PreemptionHandler()
        assert handler.sync() is False
        handler.request()
        assert handler.sync() is True
    finally:
        dist.destroy_process_group()


@pytest.fixture
def fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An `scontrol` on PATH that records its arguments and exits with $FAKE_SCONTROL_RC."""
    record = tmp_path / "calls.txt"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\necho "boom" >&2\nexit ${{FAKE_SCONTROL_RC:-0}}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return record


def test_requeue_rank0_runs_scontrol(fake_scontrol: Path) -> None:
    assert requeue_slurm_job({"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}) is True
    assert fake_scontrol.read_text().split() == ["requeue", "4242"]


def test_requeue_failure_returns_false(
    fake_scontrol: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_SCONTROL_RC", "1")
    assert requeue_slurm_job({"SLURM_JOB_ID": "7", "RANK": "0"}) is False
    assert "boom" in caplog.text


def test_requeue_only_on_rank0_of_a_slurm_job_after_sigusr1(fake_scontrol: Path) -> None:
    slurm = {"SLURM_JOB_ID": "7"}
    assert should_requeue(True, signal.SIGUSR1, 0, slurm)
    assert not should_requeue(True, signal.SIGUSR1, 1, slurm)  # one request per job
    assert not should_requeue(True, signal.SIGTERM, 0, slurm)  # a plain scancel ends the job
    assert not should_requeue(False, signal.SIGUSR1, 0, slurm)  # train.requeue = false
    assert not should_requeue(True, signal.SIGUSR1, 0, {})  # not a SLURM job
    assert requeue_slurm_job({}) is False
    assert not fake_scontrol.exists()


def test_requeue_without_scontrol(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert requeue_slurm_job({"SLURM_JOB_ID": "7"}) is False
