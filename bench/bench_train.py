"""Local training: fedsim's federated epoch (FedProx + MixUp + augmentation) vs a plain PyTorch loop.

    python bench/bench_train.py [--quick] [--device cpu|cuda] [--backbone NAME] [--compile] [--json PATH]

Both loops read the same cached patch pairs (uint8 memory maps written by this
script) through the same DataLoader, with the same model and batch size, in
the same process; their samples/s and the ratio are printed. On CUDA the
figures use bf16 autocast and channels-last, as training does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternating_times, machine, make_cache, write_json
from data.cache import CachedPairs, collate_batch
from fedsim.client import StepSettings, autocast, make_optimizer, prepare_inputs, train_epoch
from fedsim.flat import flatten
from models import build_model


def make_loader(dataset: CachedPairs, args) -> DataLoader:
    """One loader for the whole benchmark, as in training: workers start once and persist."""
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        collate_fn=collate_batch,
        num_workers=args.workers,
        pin_memory=args.device == "cuda",
        persistent_workers=args.workers > 0,
        drop_last=True,
    )


def loader_epoch(batches, settings: StepSettings) -> int:
    """The input pipeline alone: batches read from the cache and moved to the device, no model."""
    seen = 0
    for context, detail, labels, _ in batches:
        context, detail = prepare_inputs(context, detail, settings)
        seen += labels.shape[0]
    return seen


def plain_epoch(model, optimizer, batches, settings: StepSettings) -> int:
    """The reference: the textbook PyTorch loop over the same batches."""
    model.train()
    seen = 0
    for context, detail, labels, _ in batches:
        context, detail = prepare_inputs(context, detail, settings)
        labels = labels.to(settings.device, non_blocking=True)
        with autocast(settings):
            loss = F.cross_entropy(model(context, detail).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        seen += labels.shape[0]
    return seen


def run(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="fedsim-bench-"))
    dataset = CachedPairs([make_cache(tmp, args.samples, args.context, args.detail)])
    model = build_model(args.backbone, "dual", 3).to(device)
    settings = StepSettings(
        device, torch.bfloat16 if cuda else None, cuda, mu=0.01, mixup_alpha=0.2, augment=True, grad_accum=1
    )
    flat = flatten(model, channels_last=cuda)
    forward = torch.compile(model) if args.compile else model
    if cuda:
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    anchor = flat.global_params.detach().clone()
    optimizer = make_optimizer(model, 3e-4, 1e-4)
    rng = torch.Generator().manual_seed(0)
    batches = make_loader(dataset, args)
    fed = lambda: train_epoch(forward, flat, optimizer, batches, anchor, settings, rng).samples  # noqa: E731
    plain = lambda: plain_epoch(forward, optimizer, batches, settings)  # noqa: E731
    epochs = {"plain": plain, "federated": fed, "loader": lambda: loader_epoch(batches, settings)}
    samples: dict[str, int] = {}

    def counting(name: str):
        return lambda: samples.__setitem__(name, epochs[name]())

    # in turn, after one warm-up call each (cudnn autotuning, compilation, worker start, page cache)
    times = alternating_times({name: counting(name) for name in epochs}, args.repeats, sync)
    result = {name: [samples[name] / t for t in ts] for name, ts in times.items()}
    med = {k: float(np.median(v)) for k, v in result.items()}
    return {
        **med,
        "ratio": med["federated"] / med["plain"],
        "loader_headroom": med["loader"] / med["federated"],
        "samples_per_epoch": args.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None, help="default: resnetrs50 on CUDA, test_resnet on CPU")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--context", type=int, default=None, help="context patch side (default 320 CUDA / 160 CPU)")
    parser.add_argument("--detail", type=int, default=None, help="detail patch side (default 224 CUDA / 112 CPU)")
    parser.add_argument("--samples", type=int, default=None, help="patch pairs per epoch")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("resnetrs50" if cuda else "test_resnet")
    args.batch_size = args.batch_size or (64 if cuda else 16)
    args.context = args.context or (320 if cuda else 160)
    args.detail = args.detail or (224 if cuda else 112)
    args.samples = args.samples or (args.batch_size * (20 if args.quick else 50))
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.workers = args.workers if args.workers is not None else (6 if cuda else 0)
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args)
    print(
        f"{args.backbone} dual, {args.context}/{args.detail} px, batch {args.batch_size}, {args.device}"
        f"{' compiled' if args.compile else ''}:"
    )
    print(f"  plain PyTorch loop   {result['plain']:9.1f} pairs/s  (baseline)")
    print(f"  federated epoch      {result['federated']:9.1f} pairs/s  ratio {result['ratio']:.3f}")
    print(
        f"  input pipeline alone {result['loader']:9.1f} pairs/s  "
        f"{result['loader_headroom']:.1f}x the training step's consumption"
    )
    write_json(args.json, {"machine": machine(), "args": vars(args), "result": result})


if __name__ == "__main__":
    main()
