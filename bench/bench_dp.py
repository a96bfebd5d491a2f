"""DP-SGD local training vs non-private training of the same GroupNorm dual-stream model.

    python bench/bench_dp.py [--quick] [--threads N] [--backbone NAME] [--json PATH]

Three epochs take turns (alternating repetitions, medians, ratios from the
same run), each on its own copy of one GroupNorm dual-stream network over the
same cached patch pairs (random uint8, written by this script):

- ``nonprivate``: fedsim's local epoch (``fedsim.client.train_epoch``: FedProx
  term, flips/rotations, colour jitter; no MixUp, which DP refuses), batches of
  B drawn without replacement;
- ``dp_functorch`` / ``dp_hooks``: the DP-SGD epoch the integration runs:
  Poisson batches (q = B/n, round(1/q) steps), per-sample gradients
  (``torch.func`` or Opacus's per-layer samplers on hooks), clipping, noise,
  then the same FedProx gradient and Adam step on the flat buffer.

One thread by default: on a machine shared with other jobs, several OpenMP
threads that wait for each other make every figure erratic. Throughput is
patch pairs per second (a Poisson epoch sees n pairs in expectation); the
slowdown is nonprivate over DP.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternating_times, machine, make_cache, write_json
from data.cache import CachedPairs, collate_batch
from fedsim import privacy as dp
from fedsim.client import StepSettings, make_optimizer, prepare_inputs, train_epoch
from fedsim.flat import flatten
from fedsim.prox import add_proximal_grad_
from models import DualStreamNet


def group_norm_model(backbone: str) -> DualStreamNet:
    """The dual-stream network with GroupNorm backbones, as ``model.norm = "group"`` builds it."""
    return DualStreamNet(backbone, "dual", 3, norm="group")


def dp_epoch(model, flat, optimizer, loader, anchor, engine: dp.DPSGD, settings: StepSettings, rng) -> int:
    """One DP-SGD local epoch as the integration runs it; returns the pairs seen."""
    model.train()
    seen = 0
    for context, detail, labels, _ in loader:
        if labels.shape[0]:
            context, detail = prepare_inputs(context, detail, settings, rng)
            engine.backward((context, detail), labels.to(settings.device))
        engine.privatize_()
        add_proximal_grad_(flat.global_param_grads, flat.global_params, anchor, settings.mu)
        optimizer.step()
        flat.zero_grad()
        seen += labels.shape[0]
    return seen


def run(args) -> dict:
    device = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="fedsim-bench-dp-"))
    dataset = CachedPairs([make_cache(tmp, args.samples, args.context, args.detail)])
    settings = StepSettings(device, None, False, mu=0.01, mixup_alpha=0.0, augment=True, grad_accum=1)
    torch.manual_seed(0)
    base = group_norm_model(args.backbone)
    q = args.batch_size / args.samples
    epochs = {}

    plain_model = copy.deepcopy(base)
    plain_flat = flatten(plain_model)
    plain_opt = make_optimizer(plain_model, 3e-4, 1e-4)
    plain_anchor = plain_flat.global_params.detach().clone()
    plain_rng = torch.Generator().manual_seed(0)
    plain_loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        collate_fn=collate_batch,
        drop_last=True,
        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
    )
    epochs["nonprivate"] = lambda: (
        train_epoch(plain_model, plain_flat, plain_opt, plain_loader, plain_anchor, settings, plain_rng).samples
    )
    engines = []
    for method in args.methods:
        model = copy.deepcopy(base)
        flat = flatten(model)
        engine = dp.DPSGD(
            model,
            flat,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=q * args.samples,
            generator=dp.noise_generator(device, 0),
            method=method,
        )
        engines.append(engine)
        optimizer = make_optimizer(model, 3e-4, 1e-4)
        anchor = flat.global_params.detach().clone()
        rng = torch.Generator().manual_seed(0)
        loader = DataLoader(
            dataset,
            collate_fn=collate_batch,
            batch_sampler=dp.PoissonBatchSampler(len(dataset), q, torch.Generator().manual_seed(1)),
        )
        epochs[f"dp_{method}"] = lambda m=model, f=flat, o=optimizer, ld=loader, a=anchor, e=engine, r=rng: dp_epoch(
            m, f, o, ld, a, e, settings, r
        )

    # Poisson epochs see a different number of pairs each time: pairs per second is counted per call.
    seen: dict[str, list[int]] = {name: [] for name in epochs}

    def timed(name: str):
        return lambda: seen[name].append(epochs[name]())

    times = alternating_times({name: timed(name) for name in epochs}, args.repeats)
    for engine in engines:
        engine.close()
    rates = {name: [n / t for n, t in zip(seen[name][1:], ts)] for name, ts in times.items()}  # [0] = warm-up
    med = {name: float(np.median(v)) for name, v in rates.items()}
    result = {
        "pairs_per_s": med,
        "runs_pairs_per_s": rates,
        "slowdown": {name: med["nonprivate"] / med[name] for name in med if name != "nonprivate"},
        "samples_per_epoch": args.samples,
        "sample_rate": q,
        "steps_per_epoch": dp.steps_per_epoch(q),
        "num_params": plain_flat.num_params,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--batch-size", type=int, default=16, help="B; the Poisson rate is B/n")
    parser.add_argument("--context", type=int, default=64, help="context patch side")
    parser.add_argument("--detail", type=int, default=48, help="detail patch side")
    parser.add_argument("--samples", type=int, default=None, help="patch pairs per epoch (n)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: steadiest on a shared machine; 0 = torch's default)",
    )
    parser.add_argument("--methods", default="functorch,hooks", help="per-sample gradient engines, comma-separated")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.samples = args.samples or args.batch_size * (16 if args.quick else 40)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    result = run(args)
    info = machine()
    print(
        f"{args.backbone} dual (GroupNorm, {result['num_params']:,} parameters), {args.context}/{args.detail} px, "
        f"batch {args.batch_size} (Poisson q={result['sample_rate']:.4f}), CPU, {args.threads} thread(s)"
    )
    print(f"  {info['cpu']}, {info['date']}")
    pairs = result["pairs_per_s"]
    print(f"  non-private fedsim epoch  {pairs['nonprivate']:8.1f} pairs/s  (baseline)")
    for name, slow in result["slowdown"].items():
        print(f"  DP-SGD, {name[3:]:<17} {pairs[name]:8.1f} pairs/s  slowdown {slow:.2f}x")
    write_json(args.json, {"machine": info, "args": vars(args), "result": result})


if __name__ == "__main__":
    main()
