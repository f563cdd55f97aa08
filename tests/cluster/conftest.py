"""Fixtures for tests that need a real local SLURM cluster or an MPI launcher.

A missing SLURM (that apt cannot install) or a cluster that does not come up is a test ERROR with
the reason, never a skip: these tests are how CI knows the launch path works.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster.slurm_cluster import LocalSlurmCluster, SlurmUnavailable, ensure_slurm_installed

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout under test (scripts in launch/ are taken from here)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurmCluster]:
    """A running 2-node SLURM cluster on localhost (node1, node2; partition ``debug``)."""
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as exc:
        pytest.fail(f"cannot run SLURM cluster tests: {exc}", pytrace=False)
    # A short root: slurmstepd puts unix sockets under SlurmdSpoolDir (108-byte path limit).
    root = Path(tempfile.mkdtemp(prefix="rdslurm-"))
    cluster = LocalSlurmCluster(root, nodes=2, cpus_per_node=8, partition="debug")
    try:
        cluster.start(timeout=180)  # daemons on a busy machine
    except Exception as exc:  # noqa: BLE001 - turned into a clear failure
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"local SLURM cluster did not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_mpiexec() -> Path:
    """The mpiexec installed next to this interpreter (pip's mpich), by absolute path."""
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.fail(
            f"{path} not found: install the dev extras (`pip install -e '.[dev]'` brings mpich and mpi4py)",
            pytrace=False,
        )
    return path
