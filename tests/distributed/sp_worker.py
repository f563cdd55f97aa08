"""Worker for test_sequence_parallel.py: P ranks run one sequence with sequence parallelism (U x K layout),
rank 0 saves losses, gradients and the bytes each rank handed to the bucket-sharding collectives.
An optional opts.json in the folder: {"float64": true} runs the model in float64, {"eod_id": N} packs documents
(document ids of the whole window, split at token N)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model.documents import document_ids
from reformer_dist.parallel.sequence import new_sequence_parallel, sequence_parallel_loss


def main() -> None:
    out_dir, sp_size = sys.argv[1], int(sys.argv[3])  # argv[2], the layer kinds, is already in cfg.json
    ulysses_size = int(sys.argv[4]) if len(sys.argv) > 4 else sp_size
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ReformerConfig(**json.loads(open(f"{out_dir}/cfg.json").read()))
    torch.manual_seed(0)
    model = ReformerLM(cfg)
    model.load_state_dict(torch.load(f"{out_dir}/init.pt"))
    opts_file = Path(out_dir) / "opts.json"
    opts = json.loads(opts_file.read_text()) if opts_file.exists() else {}
    if opts.get("float64"):
        model.double()
    data = torch.load(f"{out_dir}/data.pt")  # [DP, L+1]
    sp, sp_rank, dp_rank, dp_size = new_sequence_parallel(sp_size, ulysses_size)
    window = data[dp_rank]
    l = window.shape[0] - 1
    n = l // sp_size
    ids = window[:-1][sp_rank * n : (sp_rank + 1) * n].unsqueeze(0)
    labels = window[1:][sp_rank * n : (sp_rank + 1) * n].unsqueeze(0)
    extra = {}
    if "eod_id" in opts:
        extra["document_ids"] = document_ids(window[:-1].unsqueeze(0), opts["eod_id"])
    loss, logged = sequence_parallel_loss(
        model, ids, labels, position_offset=sp_rank * n, sp=sp, hash_seed=11, scale_for_data_parallel=True, **extra
    )
    loss.backward()
    for p in model.parameters():  # what a data-parallel optimizer does: average over all SP x DP ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    losses = [torch.zeros((), dtype=logged.dtype) for _ in range(world)]
    dist.all_gather(losses, logged)
    sent = torch.tensor([0 if sp.bucket is None else sp.bucket.bytes_sent], dtype=torch.float64)
    all_sent = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(all_sent, sent)
    if rank == 0:
        torch.save(
            {
                "world_size": world,
                "losses": torch.stack(losses),
                "bytes_sent": torch.cat(all_sent),
                "grads": {k: p.grad for k, p in model.named_parameters()},
            },
            f"{out_dir}/result.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
