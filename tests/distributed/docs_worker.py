"""Worker for test_sequence_parallel.py: under Ulysses SP, logits of packed documents (float64) for a window and
the same window with one document changed; rank 0 saves both whole-sequence logits."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model.documents import document_ids, positions_in_document
from reformer_dist.parallel.sequence import new_sequence_parallel


def main() -> None:
    out_dir, sp_size = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    cfg = ReformerConfig(**json.loads(open(f"{out_dir}/cfg.json").read()))
    model = ReformerLM(cfg).double()
    model.load_state_dict(torch.load(f"{out_dir}/init.pt"))
    windows = torch.load(f"{out_dir}/windows.pt")  # [2, L]: the original and the one with a document changed
    sp, sp_rank, _, _ = new_sequence_parallel(sp_size)
    n = windows.shape[1] // sp_size
    results = []
    for w in windows:
        ids = w.unsqueeze(0)
        docs = document_ids(ids, eod_id=1)
        local = ids[:, sp_rank * n : (sp_rank + 1) * n]
        pos = positions_in_document(docs)[:, sp_rank * n : (sp_rank + 1) * n]
        with torch.no_grad():
            logits = model(local, document_ids=docs, positions=pos, hash_seed=4, sequence_parallel=sp)
        parts = [torch.empty_like(logits) for _ in range(sp_size)]
        dist.all_gather(parts, logits.contiguous())
        results.append(torch.cat(parts, dim=1))
    if dist.get_rank() == 0:
        torch.save(torch.stack(results), f"{out_dir}/logits.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
