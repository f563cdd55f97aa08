"""CUDA-only tests (skipped without a GPU)."""
