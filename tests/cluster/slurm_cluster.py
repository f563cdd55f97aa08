"""A real SLURM cluster on this machine for tests: one slurmctld and N simulated slurmd nodes.

Follows shared/recipes/slurm-local.md: Debian's slurm 22.05 (installed with apt when missing),
``auth/none`` (no munge), no accounting, nodes ``node1..nodeN`` all on 127.0.0.1 with their own
ports, ``SlurmdParameters=config_overrides`` so each node may claim more CPUs than exist. Every
command runs under a timeout and the daemons are always stopped (``scontrol shutdown`` then kill).

Usage::

    with LocalSlurmCluster(Path(tmp)) as cluster:
        rc, job_id = cluster.sbatch_wait(script_path, ["--nodes=2"], script_args=["--flag"])
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

# Ceiling of every wait for a job or process: generous, because the machine may be busy (CI has 2
# cores, shared). Waits end as soon as their event happens; only a hang pays the full ceiling.
CEILING_S = 600.0
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client")
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and could not be installed."""


def _run(
    cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, env=None if env is None else dict(env), check=check
    )


def ensure_slurm_installed(timeout: float = 240.0) -> None:
    """Install slurmctld/slurmd/slurm-client with apt unless ``slurmctld`` is already on PATH.

    Idempotent and quick when installed. Raises :class:`SlurmUnavailable` with the reason.
    """
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(
            "SLURM is not installed and apt-get as root is not available: install "
            "slurmctld slurmd slurm-client (Debian) to run the cluster tests"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for a dpkg lock held by a concurrent install instead of failing at once.
    install = [
        "apt-get",
        "-o",
        "DPkg::Lock::Timeout=120",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *SLURM_PACKAGES,
    ]
    deadline = time.monotonic() + timeout
    res = _run(install, timeout, env)
    if res.returncode != 0:  # package lists may be missing or stale in a fresh image
        upd = _run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=120", "update", "-q"], max(10.0, deadline - time.monotonic()), env
        )
        res = _run(install, max(10.0, deadline - time.monotonic()), env)
        if res.returncode != 0:
            raise SlurmUnavailable(
                f"apt-get install {' '.join(SLURM_PACKAGES)} failed (rc={res.returncode}):\n"
                f"{upd.stderr[-1500:]}\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}"
            )
    if not shutil.which("slurmctld"):
        raise SlurmUnavailable("apt-get succeeded but slurmctld is still not on PATH")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (Linux), so a killed pytest
    leaves no daemons behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurmCluster:
    """slurmctld + ``nodes`` slurmd daemons (``node1``..) on localhost, configured under ``root``."""

    def __init__(
        self,
        root: Path | None = None,
        nodes: int = 2,
        cpus_per_node: int = 8,
        partition: str = "debug",
        memory_mb: int = 4096,
        kill_wait_s: int = 5,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rdslurm-"))
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.memory_mb = memory_mb
        self.kill_wait_s = kill_wait_s
        self.hostname = socket.gethostname().split(".")[0]
        self.conf_path = self.root / "slurm.conf"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list = []

    # -- configuration ---------------------------------------------------------------------------
    def write_conf(self) -> Path:
        """Write slurm.conf (fresh ports each time) and create the state/spool directories."""
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            f"ClusterName=rd{os.getpid() % 100000}",
            # Random job ids: the launch scripts derive MASTER_PORT from the job id (29500 + id % 1000),
            # and several test clusters on one machine would otherwise all start at job 1.
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job may start again only after cred_expire (+1 s); default 120 s, minimum 5.
            "AuthInfo=cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Jobs that become eligible by time (e.g. requeued ones) wait for the periodic main
            # scheduling pass: every 60 s by default.
            "SchedulerParameters=sched_interval=1",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "MinJobAge=300",
            f"KillWait={self.kill_wait_s}",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=60",
            "SlurmdTimeout=60",
            "JobRequeue=1",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=NO"
        )
        self.conf_path.write_text("\n".join(lines) + "\n")
        return self.conf_path

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, without variables of any job we may be running inside."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    # -- lifecycle -------------------------------------------------------------------------------
    def _spawn(self, cmd: list[str], log_name: str) -> None:
        log = open(self.root / "log" / log_name, "ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._procs.append(proc)

    def start(self, timeout: float = 30.0, attempts: int = 2) -> "LocalSlurmCluster":
        """Start the daemons and wait until ``sinfo`` reports every node idle.

        A failed start (e.g. a port taken between choosing and binding it) is retried with fresh
        ports and state; the last failure is raised with the daemon logs.
        """
        ensure_slurm_installed()
        for attempt in range(1, attempts + 1):
            for sub in ("state", "spool"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
            self.write_conf()
            try:
                self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf_path)], "slurmctld.out")
                for name in self.nodes:
                    self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf_path)], f"slurmd-{name}.out")
                self.wait_idle(timeout)
                return self
            except Exception:
                self._stop_daemons()
                if attempt == attempts:
                    self.stop()
                    raise
            except BaseException:
                self.stop()
                raise
        return self

    def wait_idle(self, timeout: float) -> None:
        """Poll ``sinfo`` until all nodes are idle; raise with the daemon logs otherwise."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"SLURM daemon {proc.args} exited with {proc.returncode}:\n{self.logs_tail()}")
            try:
                res = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=5)
                last = res.stdout + res.stderr
                states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
                if res.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                    return
            except subprocess.TimeoutExpired:
                last = "sinfo timed out"
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout:.0f}s; last sinfo: {last!r}\n{self.logs_tail()}")

    def stop(self) -> None:
        """Stop the daemons; remove the root directory if this object created it."""
        self._stop_daemons()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_daemons(self) -> None:
        """Cancel jobs, ``scontrol shutdown``, then kill whatever of ours is still alive."""
        if self.conf_path.exists() and self._procs and all(p.poll() is None for p in self._procs):
            try:
                self.run(["scancel", "--full", "--user", "root"], timeout=10)
                deadline = time.monotonic() + 10  # let slurmstepd end the jobs' processes
                while time.monotonic() < deadline:
                    if not self.run(["squeue", "-h", "-t", "RUNNING,COMPLETING"], timeout=10).stdout.strip():
                        break
                    time.sleep(0.2)
                self.run(["scontrol", "shutdown"], timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands --------------------------------------------------------------------------------
    def run(
        self, cmd: Sequence[str], timeout: float = 30.0, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster (SLURM_CONF set), under a timeout."""
        env = self.env
        if extra_env:
            env.update(extra_env)
        return _run(cmd, timeout, env)

    def node_addr(self, node: str) -> str:
        """``NodeAddr`` of a node (the simulated names do not resolve)."""
        out = self.run(["scontrol", "show", "node", node], timeout=10).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        if not m:
            raise RuntimeError(f"no NodeAddr for {node}: {out!r}")
        return m.group(1)

    def sbatch_wait(
        self,
        script: Path | str,
        args: Iterable[str] = (),
        timeout: float = CEILING_S,
        cwd: Path | str | None = None,
        extra_env: Mapping[str, str] | None = None,
        script_args: Iterable[str] = (),
    ) -> tuple[int, str]:
        """Submit and wait until the job ends; returns (job exit code, job id).

        Same contract as ``sbatch --wait``, but polls ``scontrol show job`` every 0.25 s: sbatch's
        own wait polls at 2-10 s intervals, which costs up to 10 s per job. A signal death gives
        128 + signal. On timeout the job is cancelled and ``TimeoutError`` says why.
        """
        job = self.sbatch(script, args, cwd=cwd, extra_env=extra_env, script_args=script_args)
        info = self.wait_job(job, lambda i: i.get("JobState") in TERMINAL_STATES, timeout=timeout)
        code, _, sig = info.get("ExitCode", "1:0").partition(":")
        rc = int(code) if int(sig or 0) == 0 else 128 + int(sig)
        if info.get("JobState") != "COMPLETED" and rc == 0:
            rc = 1
        return rc, job

    def sbatch(
        self,
        script: Path | str,
        args: Iterable[str] = (),
        cwd: Path | str | None = None,
        extra_env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        script_args: Iterable[str] = (),
    ) -> str:
        """Submit without waiting: ``sbatch [args] script [script_args]``; returns the job id."""
        res = self._run_in(["sbatch", "--parsable", *args, str(script), *script_args], cwd, timeout, extra_env)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({res.returncode}): {res.stderr}")
        return res.stdout.strip().split(";")[0]

    def _run_in(
        self, cmd: Sequence[str], cwd: Path | str | None, timeout: float, extra_env: Mapping[str, str] | None
    ) -> subprocess.CompletedProcess[str]:
        env = self.env
        if extra_env:
            env.update(extra_env)
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); {} if unknown."""
        res = self.run(["scontrol", "show", "job", "-o", job_id], timeout=10)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    def wait_job(
        self, job_id: str, done: Callable[[dict[str, str]], bool], timeout: float = CEILING_S, poll_s: float = 0.25
    ) -> dict[str, str]:
        """Poll job_info until ``done(info)``; TimeoutError (with the last info and logs) otherwise."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info and done(info):
                return info
            time.sleep(poll_s)
        self.run(["scancel", job_id], timeout=10)
        raise TimeoutError(f"job {job_id} not done after {timeout}s: {info}\n{self.logs_tail()}")

    def logs_tail(self, n: int = 2000) -> str:
        """The end of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            try:
                parts.append(f"== {path.name} ==\n{path.read_text(errors='replace')[-n:]}")
            except OSError:
                pass
        return "\n".join(parts)
