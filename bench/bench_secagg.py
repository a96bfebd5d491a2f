"""Secure aggregation cost: fedsim.privacy.secagg's masked sum vs plain fedsim.fedavg and a raw all-reduce.

    python bench/bench_secagg.py [--quick] [--ranks 3] [--numel 69491892] [--prg aes|device]
                                 [--wire both|int64|int32] [--real-model] [--rounds N] [--json PATH]

Each rank holds a buffer of the dual-ResNetRS50 state's size (69,491,892
floats; ``--real-model`` builds the model itself, as bench_aggregate does) and
times, alternately in the same processes:

- ``raw_allreduce``: one float32 all-reduce of the buffer (the floor);
- ``fedavg``: ``fedsim.fedavg`` (scale, one all-reduce, divide);
- ``secure_fedavg_int64`` / ``_int32``: what fedavg with secure aggregation
  costs: scale the region by n_k / N_total (N_total known beforehand), then
  ``SecureAggregation.secure_sum_`` (quantize, mask, ONE all-reduce of masked
  integers, dequantize), with either wire format (``--wire``).

The ratio of medians against fedavg is printed, and the ratio of CPU time
summed over the ranks (process time, gloo's threads included), which other
jobs on a shared machine disturb less than wall time. Then the time of a secure sum
is split: the module's own phase timer (encode / all-reduce / decode, medians
over the rounds, all ranks contending as in a real round), and, on rank 0 alone
while the others wait, each pass of the encode and decode over the whole buffer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternating_times, machine, spawn_ranks, write_json

DUAL_RESNETRS50_STATE = 69_491_892  # floats in fedavg's reduced region of DualStreamNet("resnetrs50", "dual", 3)


class _Blob(nn.Module):
    """One parameter whose flat reduced region (with fedavg's one scratch slot) has ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(numel - 1) * 0.05)


def _model(args) -> nn.Module:
    if args.real_model:
        from models import DualStreamNet

        return DualStreamNet("resnetrs50", "dual", 3)
    return _Blob(args.numel)


def _passes(agg, buffer: torch.Tensor, args) -> dict[str, float]:
    """Seconds of each pass of one secure sum over the whole buffer, one process, no communication."""
    from fedsim.privacy import secagg

    plan = secagg.Grid(agg.world_size, secagg.DEFAULT_CLIP, secagg.DEFAULT_LEVELS)
    x = buffer.numpy()
    chunk = secagg.DEVICE_BLOCK if args.prg == "device" else secagg.HOST_CHUNK
    work = secagg.HostScratch(chunk, plan)
    wide = torch.full((x.size,), 12345, dtype=torch.int64).numpy()
    narrow = np.full(x.size, 12345, np.uint32)
    peers = list(agg._secrets.values())
    out = np.empty_like(x)
    spans = [(s, min(s + chunk, x.size)) for s in range(0, x.size, chunk)]

    def quantize():
        for s, e in spans:
            work.quantize(x[s:e], plan)

    def keystream():
        streams = [secagg.mask_stream(args.prg, p, 2**40 + i, buffer.device) for i, p in enumerate(peers)]
        for s, e in spans:
            for st in streams:
                st.take_host(e - s, work.keystream)

    def add_masks():  # the last one into the int32 wire (the tensor's memory)
        acc = work.u32
        for s, e in spans:
            for i in range(len(peers)):
                np.add(acc[: e - s], work.keystream[: e - s], out=narrow[s:e] if i == len(peers) - 1 else acc[: e - s])

    def widen():  # the int64 wire only
        acc = work.u32
        for s, e in spans:
            wide[s:e] = acc[: e - s]

    def decode_int64():
        for s, e in spans:
            work.dequantize(wide[s:e], out[s:e], plan)

    def decode_int32():
        for s, e in spans:
            work.dequantize(narrow[s:e], out[s:e], plan)

    fns = {
        "quantize": quantize,
        f"keystream x{len(peers)}": keystream,
        f"add masks x{len(peers)}": add_masks,
        "widen (int64 wire)": widen,
        "decode (int64 wire)": decode_int64,
        "decode (int32 wire)": decode_int32,
    }
    times = alternating_times(fns, repeats=3)
    return {name: statistics.median(v) for name, v in times.items()}


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from fedsim import fedavg, flatten
    from fedsim.privacy.secagg import SecureAggregation

    model = _model(args)
    flat = flatten(model)
    numel = flat.reduced.numel()
    raw = torch.ones(numel)
    counts = [100 + r for r in range(world)]
    rounds = iter(range(10**9))
    wires = ["int64", "int32"] if args.wire == "both" else [args.wire]
    aggs = {wire: SecureAggregation(prg=args.prg, wire=wire) for wire in wires}
    phases: dict[str, list[dict[str, float]]] = {wire: [] for wire in wires}

    def secure_fedavg(wire):
        # fedavg with secure aggregation: contributions pre-scaled by n_k / N_total stay inside ±clip,
        # and the sum is the weighted mean (no divide after).
        def call():
            with torch.no_grad():
                flat.reduced.mul_(counts[rank] / sum(counts))
            aggs[wire].secure_sum_(flat.reduced, next(rounds))
            phases[wire].append(aggs[wire].last_timings)

        return call

    fns = {"raw_allreduce": lambda: dist.all_reduce(raw), "fedavg": lambda: fedavg(model, counts[rank])}
    fns.update({f"secure_fedavg_{wire}": secure_fedavg(wire) for wire in wires})
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def cpu_timed(name, fn):  # CPU seconds of this process (gloo's threads included): less load-dependent
        def call():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)

        return call

    times = alternating_times(
        {name: cpu_timed(name, fn) for name, fn in fns.items()}, repeats=args.rounds, sync=dist.barrier
    )
    result = {name: statistics.median(v) for name, v in times.items()}
    mine = {name: statistics.median(v[1:]) for name, v in cpu.items()}  # the first call was the warm-up
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    result["cpu_all_ranks"] = {name: sum(r[name] for r in every) for name in mine}
    result["numel"] = numel
    result["phases"] = {wire: {k: statistics.median(p[k] for p in ph) for k in ph[0]} for wire, ph in phases.items()}
    result["clipped"] = max(agg.last_clipped for agg in aggs.values())
    if rank == 0 and not args.quick:
        result["passes_rank0_alone"] = _passes(aggs[wires[0]], flat.reduced.detach().clone(), args)
    dist.barrier()
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    return spawn_ranks(_rank, world, args)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no per-pass breakdown")
    parser.add_argument("--ranks", default="3", help="comma-separated world sizes, e.g. 2,3,4")
    parser.add_argument("--numel", type=int, default=DUAL_RESNETRS50_STATE, help="buffer elements")
    parser.add_argument("--real-model", action="store_true", help="build the dual ResNetRS50 (slower start)")
    parser.add_argument("--prg", default="aes", choices=["aes", "device"])
    parser.add_argument("--wire", default="both", choices=["both", "int64", "int32"])
    parser.add_argument("--rounds", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)
    results = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for world in [int(w) for w in args.ranks.split(",")]:
        r = run(world, args)
        results[world] = r
        mb = r["numel"] * 4 / 2**20
        print(f"{world} ranks, {r['numel']:,} floats ({mb:.0f} MiB), gloo, one thread each, prg={args.prg}:")
        print(f"  raw all-reduce (f32)  {r['raw_allreduce'] * 1e3:8.1f} ms")
        print(f"  fedavg (baseline)     {r['fedavg'] * 1e3:8.1f} ms")
        for wire, phases in r["phases"].items():
            t = r[f"secure_fedavg_{wire}"]
            c = r["cpu_all_ranks"]
            print(
                f"  secure fedavg, {wire}  {t * 1e3:8.1f} ms  ratio to fedavg {t / r['fedavg']:.2f}  "
                f"to raw all-reduce {t / r['raw_allreduce']:.2f}  (CPU time, all ranks: "
                f"{c[f'secure_fedavg_{wire}']:.2f} s vs fedavg {c['fedavg']:.2f} s, "
                f"ratio {c[f'secure_fedavg_{wire}'] / c['fedavg']:.2f})"
            )
            print(
                "      phases (median, all ranks busy): "
                + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items())
            )
        print(f"  elements clipped by the last secure sum (rank 0): {r['clipped']}")
        if "passes_rank0_alone" in r:
            print(
                "  passes over the buffer, rank 0 alone: "
                + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["passes_rank0_alone"].items())
            )
    info = {**machine(), "started": started}
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}")
    write_json(args.json, {"machine": info, "prg": args.prg, "results": results})


if __name__ == "__main__":
    main()
