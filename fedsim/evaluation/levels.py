"""From predictions to report sections: patch and image level, their summaries, and pooling across hospitals.

A prediction set (patch probabilities, labels and dataset indices, as
:func:`fedsim.client.predict` returns them) is seen at two levels: per patch,
and per image with the patch probabilities averaged (:func:`levels`).
:func:`summaries` gives both levels' summaries (:mod:`fedsim.evaluation.summaries`),
as eval.py and each hospital's test report use them; :func:`image_level` the
image-level accuracy and confusion matrix of a validation pass during training;
:func:`final_report` pools the hospitals' counts into final.json's overall figures.

Numpy only: the dataset is read through its ``meta`` list, so torch is not imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.evaluation.scores import accuracy, confusion_matrix
from fedsim.evaluation.summaries import aggregate_image_probs, count_summary, summarize, summary_from_counts

if TYPE_CHECKING:
    from data.cache import CachedPairs

__all__ = ["final_report", "image_level", "levels", "summaries"]


def levels(dataset: CachedPairs, probs: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> dict[str, dict[str, Any]]:
    """Labels, probabilities and metadata at patch level and at image level (patch probabilities averaged)."""
    meta = [dataset.meta[i] for i in idx]
    patch = {"y": np.asarray(labels), "probs": probs, "meta": meta}
    image_probs, order = aggregate_image_probs(probs, [m["image"] for m in meta])
    first = {m["image"]: m for m in reversed(meta)}
    rows = [first[i] for i in order]
    image = {"y": np.asarray([r["label"] for r in rows]), "probs": image_probs, "meta": rows}
    return {"image": image, "patch": patch}


def summaries(
    dataset: CachedPairs, probs, labels, idx, class_names, n_boot: int = 1000, seed: int = 0, counts: bool = False
) -> dict[str, Any]:
    """Image-level (patch probabilities averaged) and patch-level metric summaries of predictions.

    With ``counts`` each level also carries :func:`fedsim.evaluation.summaries.count_summary`
    figures, from which summaries pooled over hospitals are computed.
    """
    out: dict[str, Any] = {}
    for level, data in levels(dataset, probs, labels, idx).items():
        meta = data["meta"]
        by = lambda key, meta=meta: [m[key] for m in meta]  # noqa: E731
        out[level] = summarize(
            data["y"],
            data["probs"],
            list(class_names),
            magnifications=by("magnification"),
            hospitals=by("hospital"),
            patients=by("patient"),
            n_boot=n_boot,
            seed=seed,
        )
        if counts:
            out[level]["counts"] = count_summary(
                data["y"],
                np.argmax(data["probs"], axis=1),
                len(class_names),
                magnifications=by("magnification"),
                patients=by("patient"),
                n_boot=n_boot,
                seed=seed,
            )
    out["image"]["n_images"] = out["n_images"] = out["image"]["n"]
    out["patch"]["n_patches"] = out["n_patches"] = out["patch"]["n"]
    return out


def image_level(
    dataset: CachedPairs, probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, num_classes: int
) -> dict[str, Any]:
    """Image-level accuracy and confusion matrix: each image's patch probabilities averaged."""
    if len(idx) == 0:
        return {"accuracy": None, "n": 0, "confusion_matrix": None}
    image = levels(dataset, probs, labels, idx)["image"]
    cm = confusion_matrix(image["y"], image["probs"].argmax(1), num_classes)
    return {"accuracy": accuracy(cm), "n": len(image["y"]), "confusion_matrix": cm.tolist()}


def final_report(per_hospital: list[dict[str, Any]], class_names) -> dict[str, Any]:
    """Pool the hospitals' counts into overall figures with the keys of eval.json.

    Only aggregate counts crossed ranks: confusion matrices (overall, per
    magnification) and each hospital's patient-bootstrap replicates, which
    summed replicate by replicate give a bootstrap stratified by hospital.
    """
    out: dict[str, Any] = {}
    for level in ("image", "patch"):
        counts = [h[level].pop("counts") for h in per_hospital]
        mags: dict[str, np.ndarray] = {}
        for c in counts:
            for mag, cm in c["per_magnification"].items():
                mags[mag] = mags.get(mag, 0) + np.asarray(cm)
        boots = [np.asarray(c["bootstrap"]) for c in counts if len(c["bootstrap"])]
        out[level] = summary_from_counts(
            sum(np.asarray(c["confusion_matrix"]) for c in counts),
            class_names,
            per_magnification=mags,
            per_hospital_accuracy={h["hospital"]: h[level]["accuracy"] for h in per_hospital},
            bootstrap=sum(boots) if len(boots) == len(counts) else None,
        )
    out["image"]["n_images"] = out["n_images"] = out["image"]["n"]
    out["patch"]["n_patches"] = out["n_patches"] = out["patch"]["n"]
    out["accuracy"] = out["image"]["accuracy"]
    out["per_hospital_accuracy"] = out["image"]["per_hospital_accuracy"]
    out["hospitals"] = {h["hospital"]: {"image": h["image"], "patch": h["patch"]} for h in per_hospital}
    return out
