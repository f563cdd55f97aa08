"""One writer per folder: a training run's `<output.dir>/.reformer-train.lock` names the process that uses
the folder (`reformer-data` locks a store it is writing the same way: data/writer.py).
The checkpoint root (`checkpoint.dir`, default `<output.dir>/checkpoints`) carries the same lock, so that
two runs with different output folders cannot share one checkpoint root (one's rotation would delete the
other's checkpoints, and its `--resume auto` would load them).

A second `reformer-train` on a folder whose run is still going must not touch it (a fresh start would
move the live run's files aside while it keeps writing). Rank 0 takes the lock before anything in the
folder is written and removes it when the run ends, however it ends short of SIGKILL.

The lock file holds JSON: pid, host, the process's start time (`/proc/<pid>/stat`, so a recycled pid
is not mistaken for the holder), the SLURM job id, the command line and when it was taken. It is
created complete (written under a temporary name, then hard-linked into place: `link` fails when the
name exists, atomically, also on NFS). A lock left by a dead process (SIGKILL, OOM, a crashed node)
is stale and taken over when:

- the holder ran on this host and its pid is gone (or now belongs to a process started later), or
- the holder was an earlier incarnation of this SLURM job (a requeue, possibly on another node).

A holder on another host cannot be checked from here: the run refuses and says which file to delete
if that process is known to be gone.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from reformer_dist.ondisk import LOCK_NAME


class RunLockedError(RuntimeError):
    """The output folder is in use by another live run; the message names the folder and the holder."""


@dataclass
class Holder:
    pid: int
    host: str
    proc_start: str | None  # field 22 of /proc/<pid>/stat (start time in clock ticks since boot)
    job: str | None  # SLURM_JOB_ID
    started: float  # time.time() when the lock was taken
    command: str
    token: str  # unique per acquisition: release() removes only its own lock

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host}{job}, since {when}: {self.command}"


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after "pid (comm)": state is field 3, starttime field 22


def _slurm_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID") or None


def holder_alive(h: Holder) -> bool | None:
    """True/False for a holder on this host; None when it ran elsewhere (cannot be checked from here)."""
    if h.host != platform.node():
        return None
    try:
        os.kill(h.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start(h.pid)
    return not (h.proc_start and now and now != h.proc_start)  # a recycled pid is another process


class RunLock:
    """`acquire()` on rank 0 before writing into the folder, `release()` when the run ends. `key`: the config
    key or option that names the folder (what the messages call it); `path`: the lock file (default inside
    the folder; reformer-data locks a store folder from beside it, as it renames the folder into place);
    `user`: what holds such locks, for the messages."""

    def __init__(
        self,
        folder: str | Path,
        key: str = "output.dir",
        path: str | Path | None = None,
        user: str = "reformer-train run",
    ):
        self.folder = Path(folder)
        self.key, self.user = key, user
        self.path = Path(path) if path is not None else self.folder / LOCK_NAME
        self.held: Holder | None = None

    def read(self) -> Holder | None:
        """The current holder, or None when there is no lock file."""
        try:
            return Holder(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise RunLockedError(
                f"{self.folder}: lock file {self.path} is unreadable ({e}); if no other run uses this folder, delete it"
            ) from None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises RunLockedError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder(
            pid=os.getpid(),
            host=platform.node(),
            proc_start=_proc_start(os.getpid()),
            job=_slurm_job(),
            started=time.time(),
            command=" ".join(sys.argv),
            token=uuid.uuid4().hex,
        )
        tmp = self.path.with_name(f"{self.path.name}.{me.token}.tmp")
        tmp.write_text(json.dumps(asdict(me)) + "\n")
        note = None
        try:
            for _ in range(5):  # a race with another starting run: re-read and decide again
                try:
                    os.link(tmp, self.path)
                    self.held = me
                    return note
                except FileExistsError:
                    pass
                holder = self.read()
                if holder is None:
                    continue
                alive = holder_alive(holder)
                same_job = me.job is not None and holder.job == me.job
                if alive or (alive is None and not same_job):
                    raise RunLockedError(
                        f"{self.folder}: {self.key} is in use by another {self.user} ({holder.describe()}). "
                        f"Wait for it to end or choose another {self.key}; nothing in the folder was touched. "
                        + (
                            "If that process is gone (e.g. its node crashed), delete " + str(self.path)
                            if alive is None
                            else ""
                        )
                    )
                why = "an earlier start of this SLURM job" if same_job and alive is None else "no longer running"
                if self._remove_if_still(holder):
                    note = f"took over the stale lock {self.path} of {holder.describe()} ({why})"
            raise RunLockedError(f"{self.folder}: could not take the lock {self.path} (other runs keep starting here)")
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_if_still(self, holder: Holder) -> bool:
        """Remove the lock file if it still belongs to `holder` (another starting run may have replaced it)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = Holder(**json.loads(aside.read_text()))
        except (OSError, ValueError, TypeError):
            moved = None
        if moved is not None and moved.token != holder.token:  # not the one we judged: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.held is None:
            return
        try:
            current = self.read()
        except RunLockedError:
            current = None
        if current is not None and current.token == self.held.token:
            self.path.unlink(missing_ok=True)
        self.held = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
