"""Tests on a local SLURM cluster or under an MPI launcher; all marked slow."""
