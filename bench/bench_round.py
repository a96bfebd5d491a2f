"""A round's machinery with no local work vs one raw all-reduce of the same bytes; peak memory per rank.

    python bench/bench_round.py [--quick] [--ranks 3] [--backbone resnetrs50] [--hospitals-per-rank 10] [--json PATH]

Each rank builds the real model and hosts one hospital whose data is empty, so
a round is only the engine's machinery: the round's snapshot, the drift pass,
the weighting, ONE all-reduce, the post-aggregation figures, the agreement
checksum and rank 0's checkpoint, handed to the background writer from the
round's snapshot as the federation does it. Raw all-reduces of the same size,
fedavg alone and engine rounds are timed alternately in the same processes,
each after the previous checkpoint has been written (in a real round the write
runs during the next round's local training, which this benchmark has none
of); the ratios of medians are printed, and the write is timed on its own.

The memory part runs afterwards in fresh processes: ``--hospitals-per-rank``
hospitals per rank, each taking one Adam step on a two-pair batch from the
global model (fresh optimizers, FedAvg: no state that persists), and reports
each rank's peak resident memory as a multiple of the model state.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, spawn_ranks, write_json


def _setup(rank: int, world: int, port: int, args, clients_per_rank: int, batches):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from fedsim.client import StepSettings
    from fedsim.engine import Client, Engine, EngineSettings
    from fedsim.flat import flatten
    from models import DualStreamNet

    torch.manual_seed(0)
    model = DualStreamNet(args.backbone, "dual", 3)
    flat = flatten(model)
    names = [f"H{i + 1}" for i in range(world * clients_per_rank)]
    clients = [Client(i, names[i], 100 + i, batches) for i in range(rank, len(names), world)]
    step = StepSettings(torch.device("cpu"), None, False, 0.0, 0.0, False, 1)
    engine = Engine(model, flat, clients, names, [100 + i for i in range(len(names))], EngineSettings(), step)
    return model, flat, engine


def _checkpoint(model, engine, folder: Path, writer, r: int) -> None:
    """Rank 0's checkpoint as the federation writes it: from the engine's snapshot (no copy) where it can."""
    from fedsim import checkpoint

    weights = engine.state_views() or {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = {"model": weights, "round": r}
    writer.submit(lambda: checkpoint.save_round(state, folder, r, 2))


def _timing_rank(rank: int, world: int, port: int, args, queue) -> None:
    from fedsim import checkpoint, fedavg
    from fedsim.records import weights_checksum

    model, flat, engine = _setup(rank, world, port, args, 1, [])
    raw = torch.ones(flat.reduced.numel())
    writer = checkpoint.BackgroundWriter()
    folder = Path(tempfile.mkdtemp(prefix="bench-round-"))
    counter = iter(range(10**6))

    def engine_round() -> None:
        r = next(counter)
        engine.round(r, before_refresh=writer.wait)
        weights_checksum(flat.reduced)
        if rank == 0:
            _checkpoint(model, engine, folder, writer, r)

    timings = {
        "raw_allreduce": lambda: dist.all_reduce(raw),
        "fedavg": lambda: fedavg(model, 100 + rank),
        "round": engine_round,
    }

    def timed(fn) -> float:
        # The previous round's checkpoint is finished, untimed, before any measurement: a write still running
        # would slow whichever variant comes next (a real round hides it behind its local training). The time
        # ends when every rank is done.
        writer.wait()
        dist.barrier()
        started = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - started

    result = {name: [] for name in timings}
    for _ in range(args.rounds):  # alternate, so drift in machine load hits all alike
        for name, fn in timings.items():
            result[name].append(timed(fn))
    writer.wait()
    phases = dict(engine.timings)
    writes = []
    if rank == 0:  # the background write alone, from submitting it to its fsync'd rename
        for _ in range(3):
            started = time.perf_counter()
            _checkpoint(model, engine, folder, writer, next(counter))
            writer.wait()
            writes.append(time.perf_counter() - started)
        queue.put(
            {
                "numel": flat.reduced.numel(),
                "phases_last_round": phases,
                "checkpoint_write": sorted(writes)[1],
                **{k: sorted(v)[len(v) // 2] for k, v in result.items()},
            }
        )
    dist.destroy_process_group()


def _memory_rank(rank: int, world: int, port: int, args, queue) -> None:
    from fedsim.client import dual_stream_loss

    size, pairs = 32, 2  # BatchNorm needs two values per channel in training
    batch = (
        torch.randint(0, 255, (pairs, 3, size, size), dtype=torch.uint8),
        torch.randint(0, 255, (pairs, 3, size, size), dtype=torch.uint8),
        torch.zeros(pairs, dtype=torch.long),
        torch.arange(pairs),
    )
    model, flat, engine = _setup(rank, world, port, args, args.hospitals_per_rank, [batch])
    engine.loss_fn = dual_stream_loss
    state_bytes = flat.data.numel() * flat.data.element_size()
    for r in range(2):
        engine.round(r)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"rank": rank, "peak_rss": peak, "state_bytes": state_bytes})
    dist.destroy_process_group()


def _spawn(target, world: int, args) -> list:
    return spawn_ranks(target, world, args, results=1 if target is _timing_rank else world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--backbone", default="resnetrs50")
    parser.add_argument("--rounds", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--hospitals-per-rank", type=int, default=10, help="for the memory part; 0 skips it")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.quick else 9)
    timing = _spawn(_timing_rank, args.ranks, args)[0]
    mib = timing["numel"] * 4 / 2**20
    print(
        f"{args.ranks} gloo ranks, {args.backbone} dual state {timing['numel']:,} floats ({mib:.0f} MiB), "
        "no local work:"
    )
    print(f"  raw all-reduce   {timing['raw_allreduce'] * 1e3:8.1f} ms  (baseline)")
    for name in ("fedavg", "round"):
        print(f"  {name:16s} {timing[name] * 1e3:8.1f} ms  ratio {timing[name] / timing['raw_allreduce']:.3f}")
    print(
        f"  rank 0's checkpoint, written in the background: {timing['checkpoint_write'] * 1e3:.1f} ms "
        "(hidden behind the next round's local training; not in the round's time)"
    )
    print(
        "  engine phases of the last round (s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in timing["phases_last_round"].items())
    )
    memory = []
    if args.hospitals_per_rank > 0:
        memory = sorted(_spawn(_memory_rank, args.ranks, args), key=lambda m: m["rank"])
        for m in memory:
            print(
                f"  rank {m['rank']}: {args.hospitals_per_rank} hospitals, peak RSS {m['peak_rss'] / 2**20:.0f} MiB "
                f"= {m['peak_rss'] / m['state_bytes']:.2f}x the model state ({m['state_bytes'] / 2**20:.0f} MiB)"
            )
    write_json(
        args.json,
        {
            "machine": machine(),
            "backbone": args.backbone,
            "ranks": args.ranks,
            "timing": timing,
            "memory": memory,
            "hospitals_per_rank": args.hospitals_per_rank,
        },
    )


if __name__ == "__main__":
    main()
