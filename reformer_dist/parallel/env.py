"""Rank discovery: torch/DeepSpeed launcher variables, MPI (mpi4py), SLURM or a single process.

``discover()`` returns a :class:`DistEnv`; ``export_env()`` writes it back as the variables
``torch.distributed`` (``init_method="env://"``) and ``deepspeed.init_distributed`` read.
``intra_op_threads()`` decides the CPU threads of each rank. SLURM's node lists are parsed by
``parallel/hostlist.py``.

Order of precedence (``discover``):

1. ``RANK`` or ``WORLD_SIZE`` set: torchrun, the ``deepspeed`` launcher, or set by hand;
2. MPI through mpi4py, only when an MPI launcher's variables are present (``PMI_RANK``,
   ``OMPI_COMM_WORLD_SIZE``, ...), so plain runs never call ``MPI_Init``; it comes before SLURM
   because an MPI launcher inside an allocation leaves SLURM step variables that describe its helper
   processes, not the ranks (``use_mpi=False`` skips it);
3. SLURM: ``SLURM_PROCID`` inside an ``srun`` step (``SLURM_STEP_ID`` set) of more than one task; a
   batch script or ``salloc`` shell without ``srun``, or a step of one task, is a single process;
4. a single process.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping, NamedTuple

from reformer_dist.parallel.hostlist import expand_nodelist, parse_tasks_per_node

DEFAULT_PORT = 29500
SOURCES = ("torch", "slurm", "mpi", "single")

# Variables that MPI launchers (MPICH/hydra, PMI-2, PMIx, Open MPI, MVAPICH, Intel MPI) put in the
# environment of their ranks. Their presence is what makes discover() try mpi4py.
_MPI_LAUNCHER_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "I_MPI_HYDRA_TOPOLIB",
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and how ranks find each other."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torch" | "slurm" | "mpi" | "single"

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one rank."""
        return self.world_size > 1

    def to_json(self) -> str:
        """One-line JSON form (used by ``reformer-launch env``)."""
        return json.dumps(asdict(self), sort_keys=True)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """Read an integer variable; ValueError naming the variable when missing or malformed."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        if environ.get(name, "").strip():
            return name, _int(environ, name)
    return None


def _validate(env: DistEnv, names: Mapping[str, str]) -> DistEnv:
    """Check the invariants; ``names`` maps field -> the variable it came from (for messages)."""
    n = {k: names.get(k, k) for k in ("rank", "local_rank", "world_size", "local_world_size", "master_port")}
    if env.world_size < 1:
        raise ValueError(f"{n['world_size']}={env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"{n['rank']}={env.rank} is out of range for {n['world_size']}={env.world_size}")
    if env.local_world_size < 1:
        raise ValueError(f"{n['local_world_size']}={env.local_world_size} must be >= 1")
    if env.local_world_size > env.world_size:
        raise ValueError(f"{n['local_world_size']}={env.local_world_size} exceeds {n['world_size']}={env.world_size}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(
            f"{n['local_rank']}={env.local_rank} is out of range for {n['local_world_size']}={env.local_world_size}"
        )
    if not 0 < env.master_port < 65536:
        raise ValueError(f"{n['master_port']}={env.master_port} is not a valid TCP port")
    if not env.master_addr:
        raise ValueError("MASTER_ADDR is empty")
    return env


def _port(environ: Mapping[str, str]) -> tuple[int, str]:
    """MASTER_PORT, else 29500 + (SLURM_JOB_ID % 1000) so jobs sharing a node don't collide."""
    if environ.get("MASTER_PORT", "").strip():
        return _int(environ, "MASTER_PORT"), "MASTER_PORT"
    job = _first_int(environ, ("SLURM_JOB_ID", "SLURM_JOBID"))
    if job is not None:
        return DEFAULT_PORT + job[1] % 1000, job[0]
    return DEFAULT_PORT, "MASTER_PORT"


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------


def _from_torch(environ: Mapping[str, str]) -> DistEnv:
    for name in ("RANK", "WORLD_SIZE"):
        if not environ.get(name, "").strip():
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise ValueError(f"{name} is not set but {other} is (torch/deepspeed launcher variables)")
    rank = _int(environ, "RANK")
    world = _int(environ, "WORLD_SIZE")
    local_src = _first_int(environ, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))  # torchrun / deepspeed
    local_world, local_name = (local_src[1], local_src[0]) if local_src else (world, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", rank % max(local_world, 1))
    port, port_name = (
        (_int(environ, "MASTER_PORT"), "MASTER_PORT")
        if environ.get("MASTER_PORT", "").strip()
        else (DEFAULT_PORT, "MASTER_PORT")
    )
    env = DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        master_addr=environ.get("MASTER_ADDR", "").strip() or "127.0.0.1",
        master_port=port,
        source="torch",
    )
    return _validate(
        env,
        {
            "rank": "RANK",
            "local_rank": "LOCAL_RANK",
            "world_size": "WORLD_SIZE",
            "local_world_size": local_name,
            "master_port": port_name,
        },
    )


def _slurm_local_size(environ: Mapping[str, str], world: int) -> tuple[int, str]:
    """Tasks of this step on this node, from the step/job tasks-per-node lists."""
    node_id = _int(environ, "SLURM_NODEID", 0)
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        spec = environ.get(name, "").strip()
        if spec:
            counts = parse_tasks_per_node(spec, name)
            if node_id >= len(counts):
                raise ValueError(f"SLURM_NODEID={node_id} is out of range for {name}={spec!r}")
            return counts[node_id], name
    if environ.get("SLURM_NTASKS_PER_NODE", "").strip():
        return _int(environ, "SLURM_NTASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE"
    nnodes = _first_int(environ, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    if nnodes and nnodes[1] > 0 and world % nnodes[1] == 0:
        return world // nnodes[1], nnodes[0]
    return world, "SLURM_NTASKS"


def _slurm_master(environ: Mapping[str, str]) -> str:
    """MASTER_ADDR if set (simulated node names may not resolve), else the step's first host."""
    addr = environ.get("MASTER_ADDR", "").strip()
    if addr:
        return addr
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        spec = environ.get(name, "").strip()
        if spec:
            hosts = expand_nodelist(spec)
            if hosts:
                return hosts[0]
    raise ValueError("SLURM_JOB_NODELIST is not set and MASTER_ADDR is not set: cannot find the master")


def _from_slurm(environ: Mapping[str, str]) -> DistEnv | None:
    """DistEnv for an srun task, or None when this is not a multi-task srun step."""
    world_src = _first_int(environ, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    world, world_name = (world_src[1], world_src[0]) if world_src else (1, "SLURM_NTASKS")
    in_step = bool(environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "")).strip())
    if world == 1 or not in_step:
        # A batch script / salloc shell runs exactly one copy of us, whatever --ntasks says.
        return None
    rank = _int(environ, "SLURM_PROCID")
    local_world, local_name = _slurm_local_size(environ, world)
    local_rank = _int(environ, "SLURM_LOCALID", rank % max(local_world, 1))
    port, port_name = _port(environ)
    env = DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        master_addr=_slurm_master(environ),
        master_port=port,
        source="slurm",
    )
    return _validate(
        env,
        {
            "rank": "SLURM_PROCID",
            "local_rank": "SLURM_LOCALID",
            "world_size": world_name,
            "local_world_size": local_name,
            "master_port": port_name,
        },
    )


def free_port(host: str = "") -> int:
    """A TCP port free right now on `host` ("" = every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _from_mpi(environ: Mapping[str, str]) -> DistEnv | None:
    """DistEnv from mpi4py's COMM_WORLD, or None if mpi4py is missing or the world has one rank."""
    if not any(environ.get(v) for v in _MPI_LAUNCHER_VARS):
        return None
    try:
        from mpi4py import MPI  # noqa: PLC0415  (MPI_Init happens here)
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    world = comm.Get_size()
    if world <= 1:
        return None
    rank = comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world = local.Get_rank(), local.Get_size()
    local.Free()
    if rank == 0:
        addr = environ.get("MASTER_ADDR", "").strip() or socket.gethostname()
        port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT", "").strip() else free_port()
        info = (addr, port)
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    env = DistEnv(rank, local_rank, world, local_world, addr, port, "mpi")
    return _validate(env, {"master_port": "MASTER_PORT"})


def _single(environ: Mapping[str, str]) -> DistEnv:
    port, port_name = _port(environ)
    env = DistEnv(0, 0, 1, 1, environ.get("MASTER_ADDR", "").strip() or "127.0.0.1", port, "single")
    return _validate(env, {"master_port": port_name})


def discover(environ: Mapping[str, str] | None = None, use_mpi: bool = True) -> DistEnv:
    """Find rank, world size and rendezvous address from the environment (see module docstring).

    Raises ``ValueError`` naming the offending variable when the values are inconsistent.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RANK", "").strip() or environ.get("WORLD_SIZE", "").strip():
        return _from_torch(environ)
    # An MPI launcher inside a SLURM allocation (mpiexec starting its helpers through srun) leaves SLURM
    # step variables that describe the helpers, not the ranks: MPI's own variables win when present.
    if use_mpi:
        env = _from_mpi(environ)
        if env is not None:
            return env
    if environ.get("SLURM_PROCID", "").strip():
        env = _from_slurm(environ)
        if env is not None:
            return env
    return _single(environ)


MAX_THREADS_PER_CORE = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a SLURM cgroup; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class ThreadPlan(NamedTuple):
    """Intra-op threads of each rank: the count to start with, where it comes from, and whether
    `train.threads = "auto"` tunes it (training/threads.py; `count` is then the most it may use)."""

    count: int  # type: ignore[assignment]  # a field, shadowing tuple.count
    why: str
    auto: bool = False


def intra_op_threads(
    local_world_size: int, configured: int | str | None = None, environ: Mapping[str, str] | None = None
) -> ThreadPlan:
    """The threads of each rank: `configured` (train.threads) when it is a number, else $OMP_NUM_THREADS, else
    auto: up to the cores this process may run on (its affinity, e.g. a SLURM cgroup) shared out among the
    ranks on this node, the count chosen by measuring steps.

    Ranks that together ask for more threads than there are cores make each other wait at every
    parallel region; on a 2-core machine 2 ranks x 2 threads ran several times slower than 2 x 1.
    """
    environ = os.environ if environ is None else environ
    cores = usable_cores()
    most = MAX_THREADS_PER_CORE * cores  # beyond this, threads only wait for each other (and each has a stack)
    if isinstance(configured, int):
        if configured > most:
            raise ValueError(
                f"train.threads: {configured} is more than {MAX_THREADS_PER_CORE} x the {cores} cores "
                f"this process may use; expected 1..{most}"
            )
        return ThreadPlan(configured, "train.threads")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        first = omp.split(",")[0].strip()  # OpenMP's nested form "4,2": the outer level is ours
        if not first.isdigit() or not 1 <= int(first) <= most:
            raise ValueError(
                f"OMP_NUM_THREADS={omp!r}: expected a positive integer up to {most} "
                f"({MAX_THREADS_PER_CORE} x the {cores} cores this process may use); "
                "unset it to use one thread per core, or "
                "set train.threads"
            )
        return ThreadPlan(int(first), "OMP_NUM_THREADS")
    ranks = max(1, local_world_size)
    share = max(1, cores // ranks)
    where = f"{cores} cores / {ranks} rank{'s' if ranks > 1 else ''} on this node"
    if share == 1:
        return ThreadPlan(1, where)
    return ThreadPlan(share, where, auto=True)


def export_env(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from ``env``."""
    environ = os.environ if environ is None else environ  # looked up now: os.environ may have been replaced
    environ["RANK"] = str(env.rank)
    environ["LOCAL_RANK"] = str(env.local_rank)
    environ["WORLD_SIZE"] = str(env.world_size)
    environ["LOCAL_WORLD_SIZE"] = str(env.local_world_size)
    environ["MASTER_ADDR"] = env.master_addr
    environ["MASTER_PORT"] = str(env.master_port)
