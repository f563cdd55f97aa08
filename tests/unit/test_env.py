"""Rank discovery (reformer_dist.parallel.env.discover / export_env) from explicit environments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reformer_dist.parallel.env import DistEnv, discover, export_env


def slurm_step(
    procid: int,
    localid: int,
    nodeid: int,
    ntasks: int = 4,
    tasks_per_node: str = "2(x2)",
    nodelist: str = "gpu[07-08]",
    job_id: str = "123456",
    **extra: str,
) -> dict[str, str]:
    """The variables srun gives one task of a job step (as seen on a real 22.05 cluster)."""
    env = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
    }
    env.update(extra)
    return env


# -- torch / deepspeed launcher variables ------------------------------------------------------------


def test_torch_vars() -> None:
    env = discover(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "1234",
        }
    )
    assert env == DistEnv(3, 1, 8, 2, "10.0.0.1", 1234, "torch")


def test_torch_vars_deepspeed_local_size_and_defaults() -> None:
    # the deepspeed launcher sets LOCAL_SIZE rather than LOCAL_WORLD_SIZE
    env = discover({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4"})
    assert (env.local_world_size, env.master_addr, env.master_port, env.source) == (4, "127.0.0.1", 29500, "torch")
    env = discover({"RANK": "0", "WORLD_SIZE": "1"})
    assert env == DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "torch")


def test_torch_vars_win_over_slurm_and_mpi() -> None:
    environ = slurm_step(2, 0, 1) | {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_PORT": "4000",
        "PMI_RANK": "0",
        "PMI_SIZE": "2",
    }
    env = discover(environ)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_port) == ("torch", 1, 2, 1, 4000)


@pytest.mark.parametrize(
    "environ, variable",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "1"}, "WORLD_SIZE"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT"),
    ],
)
def test_torch_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        discover(environ)


# -- SLURM ---------------------------------------------------------------------------------------------


def test_slurm_two_tasks_per_node() -> None:
    """2 nodes x 2 tasks: every task gets its rank, local rank, and the first node as master."""
    seen = []
    for procid, (nodeid, localid) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        env = discover(slurm_step(procid, localid, nodeid), use_mpi=False)
        assert env.source == "slurm"
        assert (env.world_size, env.local_world_size, env.master_addr) == (4, 2, "gpu07")
        assert env.master_port == 29500 + 123456 % 1000
        seen.append((env.rank, env.local_rank))
    assert seen == [(0, 0), (1, 1), (2, 0), (3, 1)]


def test_slurm_uneven_tasks_per_node() -> None:
    # 5 tasks: 2 on node[0..1], 1 on node 2 -> local size depends on the node
    kw = {"ntasks": 5, "tasks_per_node": "2(x2),1", "nodelist": "rack[1-2]-n[3-4]"}
    last = discover(slurm_step(4, 0, 2, **kw))
    first = discover(slurm_step(0, 0, 0, **kw))
    assert (last.rank, last.local_world_size, last.master_addr) == (4, 1, "rack1-n3")
    assert (first.local_world_size, first.master_addr) == (2, "rack1-n3")


def test_slurm_nodelist_expansion_uses_step_nodes() -> None:
    # the step runs on a subset of the job's nodes: its first node hosts rank 0
    environ = slurm_step(0, 0, 0, ntasks=2, tasks_per_node="1(x2)", nodelist="node[01-03,07],gpu5")
    environ["SLURM_STEP_NODELIST"] = "node[03,07]"
    assert discover(environ).master_addr == "node03"
    del environ["SLURM_STEP_NODELIST"]
    assert discover(environ).master_addr == "node01"


def test_slurm_ntasks_per_node_fallback() -> None:
    environ = slurm_step(3, 1, 1)
    for k in ("SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"):
        del environ[k]
    environ["SLURM_NTASKS_PER_NODE"] = "2"
    assert discover(environ).local_world_size == 2


def test_slurm_master_overrides() -> None:
    env = discover(slurm_step(1, 1, 0, MASTER_ADDR="127.0.0.1", MASTER_PORT="23456"))
    assert (env.master_addr, env.master_port, env.source) == ("127.0.0.1", 23456, "slurm")


def test_slurm_batch_script_without_srun_is_single() -> None:
    """A batch script sees SLURM_PROCID=0 and SLURM_NTASKS=4 but no step id: it is one process."""
    environ = slurm_step(0, 0, 0)
    for k in (
        "SLURM_STEP_ID",
        "SLURM_STEPID",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_STEP_NODELIST",
        "SLURM_STEP_TASKS_PER_NODE",
    ):
        del environ[k]
    env = discover(environ)
    assert (env.source, env.rank, env.world_size) == ("single", 0, 1)
    assert env.master_port == 29500 + 456


def test_slurm_single_task_step_is_single() -> None:
    env = discover(slurm_step(0, 0, 0, ntasks=1, tasks_per_node="1", nodelist="n1"))
    assert env == DistEnv(0, 0, 1, 1, "127.0.0.1", 29956, "single")


@pytest.mark.parametrize(
    "change, variable",
    [
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID"),
        ({"SLURM_PROCID": "one"}, "SLURM_PROCID"),
        ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID"),
        ({"SLURM_NODEID": "5"}, "SLURM_NODEID"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x2", "SLURM_TASKS_PER_NODE": "2(x2"}, "SLURM_STEP_TASKS_PER_NODE"),
        ({"SLURM_STEP_NODELIST": "gpu[07-", "SLURM_JOB_NODELIST": "gpu[07-"}, "SLURM_JOB_NODELIST"),
        ({"SLURM_STEP_NUM_TASKS": "-3"}, "SLURM_STEP_NUM_TASKS"),
        ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, "SLURM_STEP_TASKS_PER_NODE"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID"),
    ],
)
def test_slurm_errors_name_the_variable(change: dict[str, str], variable: str) -> None:
    environ = slurm_step(1, 1, 0) | change
    with pytest.raises(ValueError, match=variable):
        discover(environ)


def test_slurm_missing_nodelist() -> None:
    environ = {k: v for k, v in slurm_step(1, 1, 0).items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        discover(environ)


# -- single / MPI fallbacks -----------------------------------------------------------------------------


def test_single_process() -> None:
    assert discover({}) == DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single")
    assert discover({"MASTER_PORT": "1111", "LOCAL_RANK": "0"}).master_port == 1111


@pytest.mark.slow
def test_no_mpi_without_launcher_vars() -> None:
    """Without an MPI launcher's variables (or with use_mpi=False) mpi4py is never imported."""
    code = (
        "import sys; from reformer_dist.parallel.env import discover; "
        "a = discover({'PATH': '/usr/bin'}); b = discover({'PMI_RANK': '0', 'PMI_SIZE': '2'}, use_mpi=False); "
        "print(a.source, b.source, 'mpi4py.MPI' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["single", "single", "False"]


# -- export_env -------------------------------------------------------------------------------------------


def test_export_env_round_trip() -> None:
    env = discover(slurm_step(3, 1, 1, MASTER_ADDR="10.1.2.3"))
    out: dict[str, str] = {"UNRELATED": "x"}
    export_env(env, out)
    assert out == {
        "UNRELATED": "x",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": str(29500 + 456),
    }
    again = discover(out)
    assert (
        again.rank,
        again.local_rank,
        again.world_size,
        again.local_world_size,
        again.master_addr,
        again.master_port,
        again.source,
    ) == (3, 1, 4, 2, "10.1.2.3", 29956, "torch")


def test_json_form() -> None:
    import json

    env = DistEnv(1, 0, 2, 1, "h", 5, "slurm")
    assert json.loads(env.to_json())["source"] == "slurm"
    assert env.distributed and not env.is_main


def test_launch_env_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`reformer-launch env` prints what discover() sees, as JSON or as shell exports."""
    import json

    from reformer_dist.cli.launch import main

    for k, v in slurm_step(2, 0, 1, MASTER_ADDR="10.9.8.7").items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["env"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {
        "rank": 2,
        "local_rank": 0,
        "world_size": 4,
        "local_world_size": 2,
        "master_addr": "10.9.8.7",
        "master_port": 29956,
        "source": "slurm",
    }
    assert main(["env", "--format", "shell"]) == 0
    assert "export RANK=2\n" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_PROCID", "9")
    assert main(["env"]) == 2
    assert "SLURM_PROCID" in capsys.readouterr().err


def test_mpi_launcher_inside_slurm_wins_over_slurm_step_variables(monkeypatch):
    """mpiexec inside an allocation starts its helpers with srun: SLURM vars describe helpers, not ranks."""
    import reformer_dist.parallel.env as envmod

    mpi = envmod.DistEnv(3, 1, 4, 2, "10.0.0.1", 29500, "mpi")
    monkeypatch.setattr(envmod, "_from_mpi", lambda environ: mpi if environ.get("PMI_RANK") else None)
    slurm_vars = {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_ID": "7",
    }
    assert envmod.discover({**slurm_vars, "PMI_RANK": "3", "PMI_SIZE": "4"}) == mpi
    assert envmod.discover(slurm_vars).source == "slurm"


# ---------------------------------------------------------------------------------------------- threads
def test_intra_op_threads_share_the_cores_among_local_ranks(monkeypatch):
    from reformer_dist.parallel.env import intra_op_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert intra_op_threads(1, None, {})[:2] == (4, "4 cores / 1 rank on this node")  # auto: at most 4
    assert intra_op_threads(2, None, {})[:2] == (2, "4 cores / 2 ranks on this node")
    assert intra_op_threads(8, None, {})[0] == 1  # never 0
    assert intra_op_threads(2, None, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS", False)
    assert intra_op_threads(2, 1, {"OMP_NUM_THREADS": "3"}) == (1, "train.threads", False)  # the config key wins
    assert intra_op_threads(2, None, {"OMP_NUM_THREADS": "4,2"})[:2] == (4, "OMP_NUM_THREADS")  # OpenMP's nested form
    # #26: a malformed or unbounded value was silently replaced (junk) or used (a million threads)
    for value in ("junk", "0", "100000"):
        with pytest.raises(
            ValueError,
            match=rf"^OMP_NUM_THREADS='{value}': expected a positive integer up to 16 "
            r"\(4 x the 4 cores this process may use\)",
        ):
            intra_op_threads(2, None, {"OMP_NUM_THREADS": value})
    with pytest.raises(
        ValueError,
        match=r"^train.threads: 17 is more than 4 x the 4 cores this process may use; "
        r"expected 1..16",
    ):
        intra_op_threads(1, 17, {})


def test_busy_machine_note(monkeypatch):
    from reformer_dist.cli.train import _busy_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.2, 0.2))
    assert _busy_cores(2) is None  # quiet: 2 threads on 2 cores
    monkeypatch.setattr("os.getloadavg", lambda: (1.4, 1.0, 0.5))  # another job holds a core
    assert _busy_cores(2) == "the machine is busy (load average 1.4 on 2 cores, and this run wants 2 threads)"
    assert _busy_cores(1) is None
