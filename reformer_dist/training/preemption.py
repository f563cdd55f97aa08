"""Preemption handling: turn SIGUSR1/SIGTERM into a flag that all ranks agree on, and requeue.

Flow (the trainer's side)::

    handler = PreemptionHandler().install()
    for step in ...:
        ...optimizer step...
        if handler.sync():            # same answer on every rank (parallel.collectives.any_rank)
            save_checkpoint(...)      # on all ranks
            barrier()
            if args.requeue:
                requeue_slurm_job()   # rank 0 only; a no-op elsewhere
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

    def __init__(self, signals: Iterable[int | signal.Signals] = DEFAULT_SIGNALS,
                 abort_on_repeat: Iterable[int | signal.Signals] = (), repeat_notice: str = "") -> None:
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


def _rank(environ: Mapping[str, str]) -> int:
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                log.warning("ignoring non-integer %s=%r", name, value)
    return 0


def requeue_slurm_job(environ: Mapping[str, str] | None = None, timeout: float = 60.0) -> bool:
    """On rank 0 of a SLURM job, ``scontrol requeue $SLURM_JOB_ID``; True when it succeeded.

    Returns False (after logging why) on other ranks, outside SLURM, or when scontrol fails. The job
    must allow requeueing (``#SBATCH --requeue``); SLURM then ends the running job and queues it
    again, so call this only after every rank has finished writing its checkpoint.
    """
    environ = os.environ if environ is None else environ  # looked up now: os.environ may have been replaced
    rank = _rank(environ)
    if rank != 0:
        log.debug("requeue skipped on rank %d", rank)
        return False
    job_id = environ.get("SLURM_JOB_ID", "").strip() or environ.get("SLURM_JOBID", "").strip()
    if not job_id:
        log.warning("requeue requested but SLURM_JOB_ID is not set (not a SLURM job)")
        return False
    cmd = ["scontrol", "requeue", job_id]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("%s failed: %s", " ".join(cmd), exc)
        return False
    if res.returncode != 0:
        log.error("%s failed (rc=%d): %s", " ".join(cmd), res.returncode, (res.stderr or res.stdout).strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True
