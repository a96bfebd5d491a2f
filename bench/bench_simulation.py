"""Many hospitals on few processes: fedsim on 1 and 2 ranks vs a plain single-process loop doing the same steps.

    python bench/bench_simulation.py [--quick] [--hospitals 30] [--per-round 10] [--rounds 10] [--json PATH]

The work (after the issue that asked for it): 30 hospitals, 10 per round,
timm ``resnet10t`` on random 3x64x64 tensors, 64 samples each, 1 local epoch,
batch 16, Adam 3e-4, 10 rounds. The floor is a plain PyTorch loop in one
process with one thread: for each participant, load the global weights, a
fresh Adam, its local steps, add its weighted model; then average. fedsim runs
the same work through ``fedsim.federate`` with 1 and 2 gloo ranks of one
thread each; its time includes every round's aggregation and figures, not the
process start. The runs alternate (floor, 1 rank, two plain loops at once, 2 ranks) and the
medians are compared. "Two plain loops at once" runs the floor's loop in two
processes, each on half of every round's participants, with no communication:
the speed-up the machine itself gives two processes, the bound for 2 ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, spawn_ranks, write_json


def _datasets(args):
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    return {
        f"H{k + 1}": TensorDataset(
            torch.randn(args.samples, 3, 64, 64, generator=gen), torch.randint(0, 2, (args.samples,), generator=gen)
        )
        for k in range(args.hospitals)
    }


def _model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=2)


def floor(args, part: int = 0, parts: int = 1, ready=None) -> float:
    """The same local steps in a plain loop: one process, one thread; with ``parts`` > 1 only every
    ``parts``-th participant of each round (one share of the work, as a rank of a dealt simulation takes)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from fedsim.engine import participants

    torch.set_num_threads(1)
    datasets, names = _datasets(args), None
    names = list(datasets)
    model = _model()
    if ready is not None:
        ready()  # the shares start together
    started = time.perf_counter()
    for r in range(args.rounds):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        chosen = participants(0, r, len(names), args.per_round)
        total = sum(len(datasets[names[i]]) for i in chosen)
        mean = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items()}
        for i in chosen[part::parts]:
            model.load_state_dict(start)
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
            model.train()
            for x, y in DataLoader(datasets[names[i]], batch_size=16, shuffle=True):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            weight = len(datasets[names[i]]) / total
            for k, v in model.state_dict().items():
                mean[k].add_(v.float(), alpha=weight)
        model.load_state_dict({k: v.to(start[k].dtype) for k, v in mean.items()})
    return time.perf_counter() - started


def _floor_share(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)  # for the start line only
    queue.put(floor(args, rank, world, ready=dist.barrier))
    dist.destroy_process_group()


def parallel_floor(world: int, args) -> float:
    """``world`` plain loops at once, each doing its share of the participants and nothing else (no
    collective): what the machine gives two independent processes. The slower one's time."""
    return max(spawn_ranks(_floor_share, world, args, results=world))


def _fedsim_rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    import fedsim
    from fedsim.dist import init_distributed

    init_distributed("cpu")
    datasets = _datasets(args)
    model = _model()
    dist.barrier()
    started = time.perf_counter()
    fedsim.federate(
        model, datasets, rounds=args.rounds, local_epochs=1, batch_size=16, lr=3e-4, clients_per_round=args.per_round
    )
    dist.barrier()
    elapsed = time.perf_counter() - started
    if rank == 0:
        queue.put(elapsed)
    dist.destroy_process_group()


def fedsim_run(world: int, args) -> float:
    return spawn_ranks(_fedsim_rank, world, args)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition of each, 3 rounds")
    parser.add_argument("--hospitals", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 3)
    times: dict[str, list[float]] = {"floor": [], "fedsim_1_rank": [], "two_plain_loops": [], "fedsim_2_ranks": []}
    for _ in range(repeats):
        times["floor"].append(floor(args))
        times["fedsim_1_rank"].append(fedsim_run(1, args))
        times["two_plain_loops"].append(parallel_floor(2, args))
        times["fedsim_2_ranks"].append(fedsim_run(2, args))
    medians = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(
        f"{args.hospitals} hospitals, {args.per_round} per round, {args.rounds} rounds, resnet10t 3x64x64, "
        f"{args.samples} samples each, batch 16:"
    )
    for name, value in medians.items():
        print(
            f"  {name:15s} {value:7.2f} s  {value / args.rounds:6.3f} s/round  "
            f"ratio to the floor {value / medians['floor']:.3f}"
        )
    print(
        f"  fedsim on 2 ranks vs two plain loops at once (what the cores give): "
        f"{medians['fedsim_2_ranks'] / medians['two_plain_loops']:.3f}"
    )
    for name in ("flwr", "pfl"):
        try:
            __import__(name)
            print(f"  {name} is installed, but this benchmark has no {name} variant yet")
        except ImportError:
            pass
    write_json(args.json, {"machine": machine(), "args": vars(args), "times": times, "medians": medians})


if __name__ == "__main__":
    main()
