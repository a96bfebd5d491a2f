"""What the embedded benchmark's images give away: colour statistics against a small CNN, per component.

    python bench/bench_cues.py [--train 600] [--test 100] [--epochs 8] [--schedule cosine] [--json PATH]

Renders a reduced copy of the study preset (``--train`` training and ``--test``
test tiles per hospital, the held-out hospital's ``--test`` tiles too; the
tiles are those of the preset, so the figures are the preset's), cuts the
patch pair at each tile's centre, and reports, on the test tiles:

- the colour control (``data.benchmark.controls``: 55 colour statistics per
  patch, multinomial logistic regression) fed both patches, the context patch
  or the detail patch, predicting the grade, the nuclear level N and the
  architecture level A, pooled and per hospital. The design asks for chance
  (1/3) everywhere; ``chance_upper`` is the 99% bound of chance at that many
  tiles.
- ``small_cnn`` (models/small_cnn.py) trained alone on the detail patches to
  predict N, and on the context patches to predict A (Adam 1e-3, constant or
  cosine over the epochs, batch 32, flips; the pixels as they are, no stain
  normalization), the test accuracy after every epoch: what a network can
  read that colour cannot.

The accuracy after one epoch swings with BatchNorm's running statistics; read
the best and the last epochs together.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json
from data.benchmark import controls as C
from data.benchmark.design import preset
from data.benchmark.hospitals import plan, profiles
from data.benchmark.render import tile_jpeg
from data.patches import extract_pairs

_STATE: dict = {}


def _init(spec) -> None:
    _STATE.update(spec=spec, sites=profiles(spec), pspec=C.patch_spec(spec))


def _render(tile) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    spec = _STATE["spec"]
    jpeg = tile_jpeg(spec, tile, _STATE["sites"][tile.hospital])
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    contexts, details = extract_pairs(rgb, C.tile_centre(spec), _STATE["pspec"])
    return contexts[0], details[0]


def render(train: int, test: int, workers: int) -> dict[str, np.ndarray]:
    spec = preset("study", train=train, val=1, test=test, heldout=test)
    tiles = [t for t in plan(spec) if t.split in ("train", "test")]
    with Pool(workers, initializer=_init, initargs=(spec,)) as pool:
        pairs = pool.map(_render, tiles, chunksize=16)
    return {
        "context": np.stack([p[0] for p in pairs]),
        "detail": np.stack([p[1] for p in pairs]),
        "grade": np.array([t.grade for t in tiles]),
        "N": np.array([t.nuclear_shown for t in tiles]),
        "A": np.array([t.arch_shown for t in tiles]),
        "hospital": np.array([t.hospital for t in tiles]),
        "train": np.array([t.split == "train" for t in tiles]),
    }


def _scores(predicted: np.ndarray, data: dict, target: str) -> dict[str, float]:
    test = ~data["train"]
    out = {"pooled": C.accuracy(predicted[test], data[target][test])}
    for h in np.unique(data["hospital"][test]):
        rows = test & (data["hospital"] == h)
        out[str(h)] = C.accuracy(predicted[rows], data[target][rows])
    return out


def colour_controls(data: dict) -> dict:
    feats = {s: np.stack([C.colour_features(p) for p in data[s]]) for s in ("context", "detail")}
    feats["both"] = np.hstack([feats["context"], feats["detail"]])
    fit = data["train"]
    out = {}
    for target in ("grade", "N", "A"):
        for stream, x in feats.items():
            model = C.fit_logistic(x[fit], data[target][fit])
            out[f"{target}/{stream}"] = _scores(model.predict(x), data, target)
    return out


def cnn_curve(
    data: dict, stream: str, target: str, epochs: int, schedule: str = "constant", seed: int = 0
) -> list[dict[str, float]]:
    import torch
    from torch import nn

    from fedsim.client import round_lr
    from models.small_cnn import SmallCNN

    torch.manual_seed(seed)
    x = torch.from_numpy(data[stream]).permute(0, 3, 1, 2).float() / 255.0 - 0.5
    y = torch.from_numpy(data[target]).long()
    model = nn.Sequential(SmallCNN(16), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    train = torch.from_numpy(np.flatnonzero(data["train"]))
    test = torch.from_numpy(np.flatnonzero(~data["train"]))
    curve = []
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = round_lr(1e-3, schedule, epoch, epochs)  # train.lr_schedule's rule, per epoch
        model.train()
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 32):
            batch = order[i : i + 32]
            xb = x[batch].flip(3) if torch.rand(()) < 0.5 else x[batch]
            loss = nn.functional.cross_entropy(model(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(x[test[i : i + 256]]).argmax(1) for i in range(0, len(test), 256)])
        full = np.zeros(len(y), dtype=np.int64)
        full[test.numpy()] = predicted.numpy()
        curve.append(_scores(full, data, target))
    return curve


def _line(name: str, scores: dict[str, float]) -> str:
    rest = " ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "pooled")
    return f"{name:22s} pooled {scores['pooled']:.3f}  {rest}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=600, help="training tiles per hospital (default 600)")
    p.add_argument("--test", type=int, default=100, help="test tiles per hospital (default 100)")
    p.add_argument("--epochs", type=int, default=8, help="small_cnn epochs (default 8)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="small_cnn's lr")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", default="bench/results/cpu-cues.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = render(args.train, args.test, args.workers)
    n_test = int((~data["train"]).sum())
    print(f"rendered {len(data['grade'])} tiles in {time.perf_counter() - started:.0f} s; {n_test} test tiles")
    print(f"chance 99% bound: pooled {C.chance_upper(n_test):.3f}, per hospital {C.chance_upper(args.test):.3f}")
    colour = colour_controls(data)
    for name, scores in colour.items():
        print(_line(f"colour {name}", scores))
    cnn = {}
    for stream, target in (("detail", "N"), ("context", "A")):
        cnn[f"{target}/{stream}"] = curve = cnn_curve(data, stream, target, args.epochs, args.schedule)
        for epoch, scores in enumerate(curve, 1):
            print(_line(f"small_cnn {target}/{stream} ep{epoch}", scores))
    write_json(
        args.json,
        {
            "machine": machine(),
            "train_per_hospital": args.train,
            "test_per_hospital": args.test,
            "schedule": args.schedule,
            "chance_upper_pooled": C.chance_upper(n_test),
            "chance_upper_hospital": C.chance_upper(args.test),
            "colour": colour,
            "small_cnn": cnn,
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
