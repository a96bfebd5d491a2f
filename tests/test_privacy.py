"""The privacy boundary: only model tensors and per-client scalar figures cross ranks."""

from __future__ import annotations

import csv
import os
import re

import torch
import torch.distributed as dist

from conftest import run_ranks

CONFIG = {
    "data": {
        "synthetic": {"image_size": 256, "patients_per_grade": 3, "images_per_patient": 2},
        "context_size": 64,
        "detail_size": 48,
        "context_fov": 96,
        "patches_per_image": 2,
        "eval_patches_per_image": 2,
    },
    "model": {"backbone": "test_resnet", "hidden": 16},
    "train": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "device": "cpu"},
}


#: A string that names a file or a folder: a separator, or a name with an extension of files the pipeline reads.
LOOKS_LIKE_A_PATH = re.compile(r"[/\\]|\.(jpe?g|png|tiff?|bmp|csv|npy|json|pt|txt)\b", re.IGNORECASE)


def _describe(obj, path="") -> list[str]:
    """Every leaf of a sent object as 'path:type', rejecting nothing (the test judges)."""
    if isinstance(obj, dict):
        return [d for k, v in obj.items() for d in _describe(v, f"{path}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [d for i, v in enumerate(obj) for d in _describe(v, f"{path}[{i}]")]
    return [f"{path}:{type(obj).__name__}"]


def _strings(obj) -> list[str]:
    """Every text of a sent object: string values and the keys of its dicts."""
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in [str(k), *_strings(v)]]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def _manifest_with_broken_images(folder) -> str:
    """The embedded dataset's manifest plus one truncated training image per hospital.

    Its header opens, so the scan of the data keeps it; decoding fails in the hospital's own cache build,
    whose skip report then holds its path.
    """
    from data.synthetic import generate
    from fedsim.config import from_dict
    from fedsim.datasetup import synthetic_root, synthetic_spec

    spec = synthetic_spec(from_dict(CONFIG), 2)
    manifest = generate(synthetic_root(from_dict(CONFIG), spec), spec, progress=False)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str(manifest.parent / row["path"])
    for hospital in ("H1", "H2"):
        row = next(r for r in rows if r["hospital"] == hospital)  # its copy joins that patient's split
        with open(row["path"], "rb") as fh:
            whole = fh.read()
        broken = folder / f"patient-of-{hospital}_broken.jpg"
        broken.write_bytes(whole[: len(whole) // 3])
        rows.append({**row, "path": str(broken)})
    out = folder / "manifest.csv"
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(out)


def _federate_and_record(rank: int, world: int, out: str, cache: str, data: str):
    os.environ["FEDSIM_CACHE"] = cache
    sent = []
    originals = {
        name: getattr(dist, name)
        for name in (
            "all_reduce",
            "broadcast",
            "all_gather",
            "gather_object",
            "all_gather_object",
            "broadcast_object_list",
        )
    }

    def spy(name):
        def call(*args, **kwargs):
            payload = args[1] if name == "all_gather_object" else args[0] if args else None  # what is sent
            if isinstance(payload, torch.Tensor):
                sent.append((name, "tensor", payload.numel(), str(payload.dtype)))
            else:
                sent.append((name, "object", _describe(payload), _strings(payload)))
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, spy(name))
    from fedsim.config import from_dict
    from fedsim.dist import init_distributed
    from fedsim.federation import Federation

    cfg = from_dict({**CONFIG, "out": out, "data": {**CONFIG["data"], "path": data}})
    federation = Federation(cfg, init_distributed("cpu", 120))
    federation.run()
    return sent, federation.flat.reduced.numel(), federation.flat.data.numel()


def test_only_weights_and_scalar_figures_cross_ranks(tmp_path, monkeypatch):
    # Prepare: the embedded data, with one unreadable image per hospital whose path its skip report keeps
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "extra").mkdir()
    data = _manifest_with_broken_images(tmp_path / "extra")

    # Execute: a real 2-hospital federation with every collective wrapped
    results = run_ranks(_federate_and_record, 2, str(tmp_path / "run"), str(tmp_path / "cache"), data, timeout=600)

    # Assert
    for sent, reduced_numel, total_numel in results:
        tensors = [s for s in sent if s[1] == "tensor"]
        objects = [s for s in sent if s[1] == "object"]
        # The weights: the initial model from rank 0, then one all-reduce of the flat buffer per round.
        assert [s[0] for s in tensors] == ["broadcast", "all_reduce", "all_reduce"]
        assert tensors[0][2] == total_numel
        assert all(s[2] == reduced_numel and s[3] == "torch.float32" for s in tensors[1:])
        # Everything else: scalar figures, short lists of them, names — no arrays, tensors or images.
        leaves = [leaf for s in objects for leaf in s[2]]
        strings = [text for s in objects for text in s[3]]
        assert leaves, "figures were gathered"
        allowed = {"int", "float", "str", "bool", "NoneType"}
        assert {leaf.rsplit(":", 1)[1] for leaf in leaves} <= allowed
        # No file or folder names: skip reports cross as counts per reason, their example paths stay home.
        assert not [text for text in strings if LOOKS_LIKE_A_PATH.search(text)]
        # No per-sample values: besides the bootstrap replicates of 3x3 count matrices, the longest list sent is
        # the per-layer drift of the model, far below a sample count.
        others = [leaf for leaf in leaves if ".bootstrap[" not in leaf]
        longest = max(int(part.split("]")[0]) for leaf in others for part in leaf.split("[")[1:]) + 1
        assert longest < 200
        replicates = [leaf for leaf in leaves if ".bootstrap[" in leaf]
        assert all(leaf.endswith(":int") and leaf.count("[") == 4 for leaf in replicates)
        assert not any("label" in leaf or "path" in leaf for leaf in leaves)
    # Each hospital kept its own detailed report, with the path of the file it skipped.
    for hospital in ("H1", "H2"):
        own = (tmp_path / "run" / "hospitals" / hospital / "data_report.json").read_text()
        assert f"patient-of-{hospital}_broken.jpg" in own
    report = (tmp_path / "run" / "data_report.json").read_text()
    assert "broken" not in report and '"total_skipped": 2' in report
