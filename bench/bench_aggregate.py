"""Aggregation cost: fedsim.fedavg on the dual-ResNetRS50 state vs one raw all-reduce of the same size.

    python bench/bench_aggregate.py [--quick] [--ranks 3] [--backbone resnetrs50] [--device cpu|cuda] [--json PATH]

Each rank builds the real model; fedavg (scale, one all-reduce, divide) and a
raw all-reduce of a flat buffer with as many elements are timed alternately in
the same processes, and the ratio of medians is printed. For reference, a loop
of one all-reduce per tensor and a pack/all-reduce/unpack are timed too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median_time, spawn_ranks, write_json


def _per_tensor(model):
    for t in model.state_dict().values():
        if t.is_floating_point():
            dist.all_reduce(t)


def _pack_unpack(model):
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    packed = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(packed)
    offset = 0
    for t in tensors:
        t.copy_(packed[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    from fedsim import fedavg, flatten
    from models import DualStreamNet

    model = DualStreamNet(args.backbone, "dual", 3).to(device)
    flat = flatten(model)
    raw = torch.ones(flat.reduced.numel(), device=device)
    sync = (lambda: (torch.cuda.synchronize(), dist.barrier())) if args.device == "cuda" else dist.barrier
    timings = {
        "raw_allreduce": lambda: dist.all_reduce(raw),
        "fedavg": lambda: fedavg(model, 100 + rank),
    }
    if not args.quick:
        timings["per_tensor_loop"] = lambda: _per_tensor(model)
        timings["pack_allreduce_unpack"] = lambda: _pack_unpack(model)
    result = {name: [] for name in timings}
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both alike
        for name, fn in timings.items():
            result[name].append(median_time(fn, repeats=1, warmup=0, sync=sync))
    if rank == 0:
        queue.put({"numel": flat.reduced.numel(), **{k: sorted(v)[len(v) // 2] for k, v in result.items()}})
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    return spawn_ranks(_rank, world, args)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no reference variants")
    parser.add_argument("--ranks", default="3", help="comma-separated world sizes, e.g. 2,3,4,6")
    parser.add_argument("--backbone", default="resnetrs50")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.quick else 11)
    results = {}
    for world in [int(w) for w in args.ranks.split(",")]:
        r = run(world, args)
        results[world] = r
        mb = r["numel"] * 4 / 2**20
        print(f"{world} ranks, {args.backbone} dual state {r['numel']:,} floats ({mb:.0f} MiB), {args.device}:")
        print(f"  raw all-reduce        {r['raw_allreduce'] * 1e3:8.1f} ms  (baseline)")
        for name in ("fedavg", "pack_allreduce_unpack", "per_tensor_loop"):
            if name in r:
                print(f"  {name:21s} {r[name] * 1e3:8.1f} ms  ratio {r[name] / r['raw_allreduce']:.3f}")
    write_json(args.json, {"machine": machine(), "backbone": args.backbone, "device": args.device, "results": results})


if __name__ == "__main__":
    main()
