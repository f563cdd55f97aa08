"""Worker for test_sequence_parallel.py: P ranks run one sequence with Ulysses SP, rank 0 saves results."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.parallel.sequence import UlyssesAttention, new_sequence_parallel_groups, sequence_parallel_loss


def main() -> None:
    out_dir, layers, sp_size = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ReformerConfig(**json.loads(open(f"{out_dir}/cfg.json").read()))
    torch.manual_seed(0)
    model = ReformerLM(cfg)
    model.load_state_dict(torch.load(f"{out_dir}/init.pt"))
    data = torch.load(f"{out_dir}/data.pt")  # [DP, L+1]
    group, sp_rank, dp_rank, dp_size = new_sequence_parallel_groups(sp_size)
    sp = UlyssesAttention(group)
    window = data[dp_rank]
    l = window.shape[0] - 1
    n = l // sp_size
    ids = window[:-1][sp_rank * n : (sp_rank + 1) * n].unsqueeze(0)
    labels = window[1:][sp_rank * n : (sp_rank + 1) * n].unsqueeze(0)
    loss, logged = sequence_parallel_loss(model, ids, labels, position_offset=sp_rank * n, sp=sp, hash_seed=11,
                                          scale_for_data_parallel=True)
    loss.backward()
    for p in model.parameters():  # what a data-parallel optimizer does: average over all SP x DP ranks
        dist.all_reduce(p.grad)
        p.grad /= world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, logged)
    if rank == 0:
        torch.save({"world_size": world, "losses": torch.stack(losses),
                    "grads": {k: p.grad for k, p in model.named_parameters()}}, f"{out_dir}/result.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
