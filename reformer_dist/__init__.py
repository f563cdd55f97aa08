"""reformer_dist: a Reformer language model trained with DeepSpeed ZeRO at up to millions of tokens."""

from reformer_dist.model.config import ReformerConfig

__all__ = ["ReformerConfig", "ReformerLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import reformer_dist` (e.g. for config validation) does not build the model code.
    if name == "ReformerLM":
        from reformer_dist.model.reformer import ReformerLM

        return ReformerLM
    raise AttributeError(name)
