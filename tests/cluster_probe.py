"""One rank of a small all-reduce check, started with torchrun's variables set (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): by ``analysis.cluster`` in each node, or by test_cluster.py on this host.

    python tests/cluster_probe.py OUT_DIR

Rank r reduces the same seeded tensors with several algorithms (float32, a size that does not
divide by the world size) and writes them, raw, to ``OUT_DIR/rank<r>.pt`` with its inputs'
float64 sum computed locally by rank 0, so the test can compare runs bit for bit.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import ringcomm

ALGOS = (("ring", {}), ("ps", {}), ("ps", {"ps_overlap": True, "ps_segment_bytes": 4096}), ("rhd", {}))
NUMEL = 10_003  # not a multiple of any world size tried: uneven chunks and shards


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = [torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 + r)) for r in range(world)]
    results = {}
    for algo, options in ALGOS:
        t = inputs[rank].clone()
        ringcomm.all_reduce(t, algo=algo, timeout=60, **options)
        results[algo + ("+overlap" if options else "")] = t
    expected = torch.stack([x.double() for x in inputs]).sum(0)
    torch.save(
        {"results": results, "expected": expected, "world": world}, os.path.join(out, f"rank{rank}.pt")
    )
    ringcomm.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
