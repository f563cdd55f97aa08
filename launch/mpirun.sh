#!/usr/bin/env bash
# N ranks through MPI: the trainer discovers rank/world size with mpi4py (rank 0 picks the port).
#   NP=4 launch/mpirun.sh [--set section.key=value ...] [--resume auto]
# Knobs: NP (ranks, default 2), CONFIG, PYTHON, MPIEXEC (default: the mpiexec next to $PYTHON, i.e.
# pip's mpich in the venv: launcher and MPI library must match), MPIEXEC_ARGS (e.g. "-hosts a,b").
# Open MPI as root also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-$REPO/configs/quickstart.toml}"
NP="${NP:-2}"
if [[ -z "${VIRTUAL_ENV:-}" && -f "$REPO/.venv/bin/activate" ]]; then
    set +u; source "$REPO/.venv/bin/activate"; set -u
fi
PYTHON="$(command -v "${PYTHON:-python}")"
MPIEXEC="${MPIEXEC:-$(dirname "$PYTHON")/mpiexec}"
[[ -x "$MPIEXEC" ]] || MPIEXEC="$(command -v mpiexec)"
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE LOCAL_SIZE
# shellcheck disable=SC2086  # MPIEXEC_ARGS is split on purpose
exec "$MPIEXEC" -n "$NP" ${MPIEXEC_ARGS:-} "$PYTHON" -m reformer_dist.cli.train --config "$CONFIG" "$@"
