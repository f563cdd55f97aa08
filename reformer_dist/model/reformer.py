"""`ReformerLM`: embeddings -> reversible stack -> chunked LM head. A plain nn.Module (no DeepSpeed).

Shapes: B batch, L length (Lp after internal padding), D d_model, V vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.model.bucket_rules import DOCUMENT_MASKS_REFUSED
from reformer_dist.model.config import TRAINED_WITH, ReformerConfig
from reformer_dist.model.context import AttentionContext, SequenceParallelSeam
from reformer_dist.model.embeddings import AxialPositionEmbedding
from reformer_dist.model.generation import generate_cached, sample_next
from reformer_dist.model.loss import IGNORE_INDEX, LMHead
from reformer_dist.model.reversible import ReformerStack
from reformer_dist.ondisk import CONFIG_NAME, load_weights


def shift_labels(input_ids: Tensor) -> Tensor:
    """Next-token targets aligned with positions: labels[t] = input_ids[t+1], the last one ignored."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)


class ReformerLM(nn.Module):
    """Reformer language model (HF-compatible layout: two streams, 2*D final LayerNorm, bias-free head).

    ``model(ids)`` -> logits [B, L, V]; ``model(ids, labels=y)`` -> mean chunked cross-entropy (no L x V
    logits). ``hash_seed`` picks the LSH rotations (the trainer passes base seed + step);
    ``position_offset`` is the global position of ids[:, 0] (sequence parallelism).
    """

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = AxialPositionEmbedding(cfg)
        self.stack = ReformerStack(cfg)
        self.head = LMHead(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids: Tensor, position_offset: int, name: str = "input_ids") -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor of token ids [batch, length], got {type(input_ids).__name__}"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"{name}: expected shape [batch, length], got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer token ids (torch.long), got dtype {input_ids.dtype}")
        end = position_offset + input_ids.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"input_ids: positions up to {end} exceed axial_pos_shape "
                f"{self.cfg.axial_pos_shape} (max {self.cfg.max_seq_len} tokens); enlarge axial_pos_shape"
            )
        if input_ids.numel() and not input_ids.is_cuda:  # on GPU this check would sync the host every step
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"input_ids: token ids must be in [0, vocab_size={self.cfg.vocab_size}), got min {lo} max {hi}"
                )

    def streams(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        positions: Tensor | None = None,
        position_offset: int = 0,
        hash_seed: int | None = None,
        n_hashes: int | None = None,
        sequence_parallel: SequenceParallelSeam | None = None,
    ) -> tuple[Tensor, Tensor, int]:
        """The two final residual streams [B, Lp, D] each (Lp = L padded to the chunk lengths) and L.

        ``document_ids`` [B, L] (``model.documents.document_ids``): a token attends only to tokens of its own
        document; under sequence parallelism give the whole sequence's ids (attention sees all of it).
        ``positions`` [B, L]: position of every token for the position embeddings (e.g. restarting per
        document, ``model.documents.positions_in_document``); default ``position_offset + arange(L)``.
        ``n_hashes``: LSH rounds of this call (default the config's; more rounds at evaluation keep the trained
        rotations and add new ones, ``hashing.make_rotations``).
        """
        x, actx, l = self.embed(
            input_ids,
            attention_mask,
            document_ids=document_ids,
            positions=positions,
            position_offset=position_offset,
            hash_seed=hash_seed,
            n_hashes=n_hashes,
            sequence_parallel=sequence_parallel,
        )
        x1, x2 = self.stack(x, x, actx)
        return x1, x2, l

    def embed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        positions: Tensor | None = None,
        position_offset: int = 0,
        hash_seed: int | None = None,
        n_hashes: int | None = None,
        sequence_parallel: SequenceParallelSeam | None = None,
    ) -> tuple[Tensor, AttentionContext, int]:
        """Embeddings [B, Lp, D] of the padded input, the attention context of the call, and L (see ``streams``)."""
        self._check_inputs(input_ids, position_offset)
        if n_hashes is not None and (not isinstance(n_hashes, int) or isinstance(n_hashes, bool) or n_hashes < 1):
            raise ValueError(f"n_hashes: expected an integer >= 1 (LSH hash rounds), got {n_hashes!r}")
        b, l = input_ids.shape
        sp = 1 if sequence_parallel is None else sequence_parallel.size
        if document_ids is not None and sequence_parallel is not None and sequence_parallel.bucket is not None:
            raise ValueError(f"document_ids: {DOCUMENT_MASKS_REFUSED}")
        if document_ids is not None and tuple(document_ids.shape) != (b, l * sp):
            raise ValueError(
                f"document_ids: expected shape {(b, l * sp)} (the whole sequence), got {tuple(document_ids.shape)}"
            )
        if positions is not None and tuple(positions.shape) != (b, l):
            raise ValueError(f"positions: expected shape {(b, l)}, got {tuple(positions.shape)}")
        # Pad to a multiple of the chunk lengths; padded keys are masked and hashed to a bucket of their own.
        pad = self.padded_length(l) - l
        key_valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if sequence_parallel is not None:
            # Each rank holds a slice: padding is decided on the whole sequence, so it must already fit
            # (parallel.sequence.check_layout, checked once when the run config loads).
            if attention_mask is not None:
                raise ValueError("attention_mask is not supported with sequence parallelism")
            pad = 0
        docs = None if document_ids is None else document_ids.to(torch.int32)
        if positions is None:
            positions = torch.arange(position_offset, position_offset + l, device=input_ids.device)
        if pad:
            input_ids = F.pad(input_ids, (0, pad), value=0)
            valid = torch.ones(b, l, dtype=torch.bool, device=input_ids.device) if key_valid is None else key_valid
            key_valid = F.pad(valid, (0, pad), value=False)
            if docs is not None:  # padding is a document of its own, after every real one
                docs = F.pad(docs, (0, pad), value=torch.iinfo(torch.int32).max)
            if positions.dim() == 2:  # padded positions repeat the last one (masked keys, ignored labels)
                positions = torch.cat([positions, positions[:, -1:].expand(b, pad)], dim=1)
            else:
                positions = torch.arange(position_offset, position_offset + l + pad, device=input_ids.device)
        positions = positions.clamp(max=self.cfg.max_seq_len - 1)  # padding may run past the last position
        x = F.dropout(self.tok_emb(input_ids), self.cfg.dropout, self.training) + self.pos_emb(positions)
        actx = AttentionContext(
            hash_seed=self.cfg.hash_seed if hash_seed is None else int(hash_seed),
            n_hashes=n_hashes,
            key_valid=key_valid,
            document_ids=docs,
            backend=self.cfg.attention_backend,
            sequence_parallel=sequence_parallel,
        )
        return x, actx, l

    def padded_length(self, length: int) -> int:
        """Length attention sees for ``length`` tokens: a multiple of the chunk lengths in use, unless the
        sequence fits in the shortest chunk (then unpadded)."""
        if length <= self._min_chunk():
            return length
        mult = self.cfg.pad_multiple()
        return -(-length // mult) * mult

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """Final concatenated streams [B, L, 2D] (before the head's LayerNorm)."""
        x1, x2, l = self.streams(input_ids, attention_mask, **kwargs)
        return torch.cat([x1[:, :l], x2[:, :l]], dim=-1)

    def _min_chunk(self) -> int:
        lens = [self.cfg.chunk_len if t == "lsh" else self.cfg.local_chunk for t in self.cfg.attn_layers if t != "full"]
        return min(lens) if lens else 1

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        positions: Tensor | None = None,
        position_offset: int = 0,
        hash_seed: int | None = None,
        n_hashes: int | None = None,
        reduction: str = "mean",
        sequence_parallel: SequenceParallelSeam | None = None,
    ):
        """Logits [B, L, V] without labels; with labels the chunked cross-entropy: its mean over labels !=
        ``IGNORE_INDEX`` (-100; ``reduction="mean"``), ``(sum, count)`` (``reduction="sum"``, for averaging across
        ranks), or ``(losses, predictions)`` (``reduction="none"``, evaluation, no gradient): each position's loss
        [B, L] (0 where the label is ``IGNORE_INDEX``) and argmax prediction [B, L].
        ``document_ids``, ``positions`` and ``n_hashes`` (LSH rounds of this call): see ``streams``."""
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        x1, x2, l = self.streams(
            input_ids,
            attention_mask,
            document_ids=document_ids,
            positions=positions,
            position_offset=position_offset,
            hash_seed=hash_seed,
            n_hashes=n_hashes,
            sequence_parallel=sequence_parallel,
        )
        if labels is None:
            return self.head(x1[:, :l], x2[:, :l])
        if reduction == "none":
            b, lp, d = x1.shape  # padded positions scored with ignored labels (no sliced copies of the streams)
            losses, preds = self.head(
                x1.reshape(-1, d),
                x2.reshape(-1, d),
                F.pad(labels, (0, lp - l), value=IGNORE_INDEX).reshape(-1),
                per_token=True,
            )
            return losses.view(b, lp)[:, :l], preds.view(b, lp)[:, :l]
        # padded positions get ignored labels, so the head reads the streams as they are (no sliced copies)
        total = self.head(x1, x2, F.pad(labels, (0, x1.shape[1] - l), value=IGNORE_INDEX))
        count = (labels != IGNORE_INDEX).sum()
        if reduction == "sum":
            return total, count
        return total / count.clamp(min=1)

    def loss(self, input_ids: Tensor, labels: Tensor | None = None, **kwargs) -> Tensor:
        """Mean next-token cross-entropy; labels default to the inputs shifted by one."""
        return self(input_ids, shift_labels(input_ids) if labels is None else labels, **kwargs)

    def _check_generate_args(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        hash_seed: int,
        n_hashes: int | None,
    ) -> None:
        """ValueError/TypeError naming the argument and what it must be, before any work."""

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        self._check_inputs(prompt_ids, 0, name="prompt_ids")
        if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
            raise ValueError(
                f"prompt_ids: expected at least one sequence of at least one token, got shape {tuple(prompt_ids.shape)}"
            )
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise ValueError(f"temperature: expected a finite number (<= 0: greedy), got {temperature!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
        if not is_int(hash_seed) or hash_seed < 0:
            raise ValueError(f"hash_seed: expected an integer >= 0, got {hash_seed!r}")
        if n_hashes is not None and (not is_int(n_hashes) or n_hashes < 1):
            raise ValueError(f"n_hashes: expected an integer >= 1 (LSH hash rounds), got {n_hashes!r}")

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        hash_seed: int = 0,
        generator: torch.Generator | None = None,
        *,
        n_hashes: int | None = None,
        use_cache: bool = True,
        return_logits: bool = False,
        document_ids: Tensor | None = None,
    ):
        """Sample ``max_new_tokens`` after ``prompt_ids`` [B, P] (greedy when ``temperature <= 0``): [B, P + N].

        ``use_cache=True``: the prompt runs once, then each token costs O(layers x (window + buckets))
        attention work (``model.generation``; what it reproduces exactly and what it approximates:
        docs/model.md). ``use_cache=False``: the whole context is recomputed per token (O(L) per token; a
        context longer than ``max_seq_len`` slides). ``n_hashes``: LSH rounds (see ``streams``).
        ``return_logits``: also return the logits [B, N, V] each new token was drawn from.
        """
        if document_ids is not None:
            raise ValueError(
                "document_ids: generation with document masks is not supported; start each document from its own prompt"
            )
        self._check_generate_args(prompt_ids, max_new_tokens, temperature, top_k, hash_seed, n_hashes)
        if use_cache:
            ids, cached = generate_cached(
                self,
                prompt_ids,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                hash_seed=hash_seed,
                n_hashes=n_hashes,
                generator=generator,
            )
            return (ids, cached) if return_logits else ids
        ids, scores = prompt_ids, []
        for _ in range(max_new_tokens):
            ctx = ids[:, -self.cfg.max_seq_len :]
            x1, x2, l = self.streams(ctx, hash_seed=hash_seed, n_hashes=n_hashes)
            logits = self.head(x1[:, l - 1 : l], x2[:, l - 1 : l])[:, -1]
            scores.append(logits)
            ids = torch.cat([ids, sample_next(logits.float(), temperature, top_k, generator)], dim=1)
        if not return_logits:
            return ids
        empty = prompt_ids.new_zeros(prompt_ids.shape[0], 0, self.cfg.vocab_size, dtype=self.head.proj.weight.dtype)
        return ids, torch.stack(scores, dim=1) if scores else empty

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self,
        directory: str | Path,
        max_shard_size: str | int = "5GB",
        trained_with: dict[str, bool] | None = None,
        extra_files: dict[str, str | bytes] | None = None,
    ) -> None:
        """Write config.json + model.safetensors (the parameters' dtype) + checksums.json, through the one
        atomic, checksummed writer `reformer-ckpt consolidate` uses (modes follow the umask). Other files in
        an existing `directory` stay; the weights folder's own files are replaced. `trained_with`: the
        document settings of the training run, recorded in config.json (config.TRAINED_WITH). `extra_files`
        (name -> content) are written and checksummed with them (the trainer's record of its data)."""
        # checkpoint/writer.py imports nothing of the model: a lazy import keeps model/ free of checkpoint/
        from reformer_dist.checkpoint.writer import write_weights_dir

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {**self.cfg.to_dict(), **({TRAINED_WITH: dict(trained_with)} if trained_with is not None else {})}
        write_weights_dir(
            directory,
            state,
            config,
            max_shard_size=max_shard_size,
            overwrite="merge",
            metadata={"config": json.dumps(self.cfg.to_dict())},
            extra_files=extra_files,
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "ReformerLM":
        """Load a directory written by ``save_pretrained`` or ``reformer-ckpt consolidate``."""
        d = Path(directory)
        cfg_path = d / CONFIG_NAME
        if d.is_file():
            raise NotADirectoryError(f"{d}: is a file; expected a directory with {CONFIG_NAME} and weights")
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: missing; expected a directory with {CONFIG_NAME} and weights")
        model = cls(ReformerConfig.load(cfg_path))
        state = load_weights(d, map_location=map_location)
        want = model.state_dict()
        for k, v in state.items():  # load_state_dict would raise a RuntimeError listing every size mismatch
            if k in want and tuple(v.shape) != tuple(want[k].shape):
                raise ValueError(
                    f"{d}: weight {k} has shape {tuple(v.shape)}, but {cfg_path} needs "
                    f"{tuple(want[k].shape)}: the weights do not belong to this config"
                )
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{d}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model
