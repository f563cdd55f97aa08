"""Preemption handling: turn SIGUSR1/SIGTERM into a flag that all ranks agree on, and requeue.

Flow (the trainer's side)::

    handler = PreemptionHandler().install()
    for step in ...:
        ...optimizer step...
        if handler.sync():            # same answer on every rank (parallel.collectives.any_rank)
            save_checkpoint(...)      # on all ranks
            if should_requeue(cfg.train.requeue, handler.signum, rank):
                requeue_slurm_job()   # rank 0 of a SLURM job, SIGUSR1 only
            break                     # exit 0

The SLURM scripts in ``launch/slurm/`` ask for ``--signal=B:USR1@120`` and forward it to the
ranks; SIGTERM (preemption, ``scancel``) arrives at every rank directly and leaves ``KillWait``
seconds before SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any, Iterable, Mapping

from reformer_dist.parallel.collectives import any_rank

log = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Signal handlers that only record that a stop was requested (and by which signal)."""

    def __init__(
        self,
        signals: Iterable[int | signal.Signals] = DEFAULT_SIGNALS,
        abort_on_repeat: Iterable[int | signal.Signals] = (),
        repeat_notice: str = "",
    ) -> None:
        """`abort_on_repeat`: signals whose second arrival takes the default action at once (Ctrl-C twice);
        `repeat_notice` is written to stderr when the first one arrives."""
        self.signals: tuple[int, ...] = tuple(int(s) for s in signals)
        self.abort_on_repeat: tuple[int, ...] = tuple(int(s) for s in abort_on_repeat)
        self._notice = repeat_notice.encode()
        self._flag = False
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handler ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only plain assignments: no I/O, locks or allocation-heavy work in a signal handler.
        self._signum = signum
        self._flag = True
        if signum in self.abort_on_repeat:
            signal.signal(signum, signal.SIG_DFL)  # the next one terminates the process, even inside a collective
            if self._notice:
                os.write(2, self._notice)  # unbuffered: safe even if the main thread was inside a print

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only); remembers the previous ones for uninstall()."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before install()."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # -- state -----------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """True once one of the signals arrived here (or request() was called)."""
        return self._flag

    @property
    def signum(self) -> int | None:
        """The last signal received, or None."""
        return self._signum

    @property
    def signal_name(self) -> str | None:
        """Name of the last signal received (e.g. ``"SIGUSR1"``), or None."""
        return None if self._signum is None else signal.Signals(self._signum).name

    def request(self) -> None:
        """Ask for a stop without a signal (e.g. a wall-clock budget in the trainer)."""
        self._flag = True

    def sync(self, group: Any = None) -> bool:
        """Whether any rank was asked to stop; the same value on every rank.

        With ``torch.distributed`` initialized this is a collective (every rank must call it at the
        same step): ``parallel.collectives.any_rank`` of the local flag. Without it, the local flag.
        """
        stop = any_rank(self._flag, group)
        if stop and not self._flag:
            log.info("preemption requested on another rank; stopping at this step")
        return stop


def job_id(environ: Mapping[str, str]) -> str | None:
    """The SLURM job id, or None outside SLURM."""
    return environ.get("SLURM_JOB_ID", "").strip() or environ.get("SLURM_JOBID", "").strip() or None


def should_requeue(enabled: bool, signum: int | None, rank: int, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process asks SLURM to requeue the job after its preemption checkpoint: `train.requeue`,
    rank 0 (once per job), inside a SLURM job, and only for SIGUSR1 (``sbatch --signal=B:USR1@120``, forwarded
    to every rank: "time is up, come back"); SIGTERM from a plain ``scancel`` must end the job."""
    environ = os.environ if environ is None else environ
    return enabled and rank == 0 and job_id(environ) is not None and signum == signal.SIGUSR1


def requeue_slurm_job(environ: Mapping[str, str] | None = None, timeout: float = 60.0) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (call it on one rank: `should_requeue`); True when it succeeded.

    Returns False (after logging why) outside SLURM or when scontrol fails. The job must allow requeueing
    (``#SBATCH --requeue``); SLURM then ends the running job and queues it again, so call this only after
    every rank has finished writing its checkpoint.
    """
    environ = os.environ if environ is None else environ  # looked up now: os.environ may have been replaced
    job = job_id(environ)
    if job is None:
        log.warning("requeue requested but SLURM_JOB_ID is not set (not a SLURM job)")
        return False
    cmd = ["scontrol", "requeue", job]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error(f"{' '.join(cmd)} failed: {exc}")
        return False
    if res.returncode != 0:
        log.error(f"{' '.join(cmd)} failed (rc={res.returncode}): {(res.stderr or res.stdout).strip()}")
        return False
    log.info(f"requeued SLURM job {job}")
    return True
