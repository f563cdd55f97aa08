"""Multi-process tests (gloo ranks under torchrun or the DeepSpeed launcher); all marked slow."""
