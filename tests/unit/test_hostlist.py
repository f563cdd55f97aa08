"""SLURM hostlist expansion (reformer_dist.parallel.env.expand_nodelist)."""

from __future__ import annotations

import pytest

from reformer_dist.parallel.hostlist import expand_nodelist, parse_tasks_per_node


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("", []),
        ("gpu5", ["gpu5"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[08-11]", ["node08", "node09", "node10", "node11"]),
        ("node[001-002]", ["node001", "node002"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
        (
            "node[01-03,07],gpu5,rack[1-2]-n[3-4]",
            ["node01", "node02", "node03", "node07", "gpu5", "rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"],
        ),
        ("a[1,3],b[2]", ["a1", "a3", "b2"]),
        ("host-1.example.org,host-2", ["host-1.example.org", "host-2"]),
        (" node[1-2] ", ["node1", "node2"]),
    ],
)
def test_expand(spec: str, expected: list[str]) -> None:
    assert expand_nodelist(spec) == expected


@pytest.mark.parametrize(
    "bad", ["node[1-3", "node1-3]", "node[[1]]", "node[a-b]", "node[3-1]", "node[]", "node[1,,2]", "a,,b", "node[1-]"]
)
def test_malformed_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_large_range_count() -> None:
    hosts = expand_nodelist("n[0000-1023]")
    assert len(hosts) == 1024 and hosts[0] == "n0000" and hosts[-1] == "n1023"


@pytest.mark.parametrize(
    "spec, expected",
    [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3])],
)
def test_tasks_per_node(spec: str, expected: list[int]) -> None:
    assert parse_tasks_per_node(spec) == expected


def test_tasks_per_node_bad() -> None:
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("2(x)")


# -- `reformer-launch hostfile` (DeepSpeed hostfile from a SLURM node list) ------------------------------


def test_hostfile_cli(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from reformer_dist.cli.launch import main

    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02],cpu7")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    out = tmp_path / "sub" / "hostfile"
    assert main(["hostfile", "--out", str(out)]) == 0
    assert out.read_text() == "gpu01 slots=8\ngpu02 slots=8\ncpu7 slots=8\n"
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    assert main(["hostfile"]) == 0
    assert capsys.readouterr().out == "gpu01 slots=4\ngpu02 slots=4\ncpu7 slots=4\n"
    assert main(["hostfile", "--nodelist", "n[1-2]", "--slots", "2"]) == 0
    assert capsys.readouterr().out == "n1 slots=2\nn2 slots=2\n"
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    assert main(["hostfile", "--nodelist", "n1"]) == 0
    assert capsys.readouterr().out == "n1 slots=1\n"


def test_hostfile_cli_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from reformer_dist.cli.launch import main

    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert main(["hostfile"]) == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err
    assert main(["hostfile", "--nodelist", "n[1-", "--slots", "1"]) == 2
    assert main(["hostfile", "--nodelist", "n1", "--slots", "0"]) == 2


def test_environment_defaults_survive_a_replaced_os_environ(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # `datasets` map(num_proc>1) assigns a copy to os.environ; a function whose default argument is
    # os.environ (bound at import) then reads a stale environment. Ours look it up when called.
    import os

    from reformer_dist.cli.launch import default_slots, main

    monkeypatch.setattr(os, "environ", os.environ.copy())  # restored afterwards by monkeypatch
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    assert default_slots() == 8
    assert main(["hostfile", "--nodelist", "n1"]) == 0
    assert capsys.readouterr().out == "n1 slots=8\n"
