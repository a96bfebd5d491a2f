"""One real torchrun job: 3 hospitals, 2 rounds, tiny backbone, embedded synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL, evaluate, ranks, together, torchrun, train_single


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    out = root / "run"
    proc = torchrun([*SMALL, "--rounds", "2", "--out", str(out)], root / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_run_writes_every_output(demo_run):
    out, _ = demo_run
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "final.json", "splits.csv", "data_report.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["round"] == 1 and state["class_names"] == ["Grade I", "Grade II", "Grade III"]
    final = json.loads((out / "final.json").read_text())
    assert 0 <= final["accuracy"] <= 1 and set(final["per_hospital_accuracy"]) == {"H1", "H2", "H3"}
    for level in ("image", "patch"):
        for key in (
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "qwk",
            "per_class_recall",
            "per_class_precision",
            "per_magnification_accuracy",
            "per_hospital_accuracy",
            "confusion_matrix",
            "ci95",
        ):
            assert key in final[level], (level, key)
        low, high = final[level]["ci95"]["accuracy"]
        assert low <= final[level]["accuracy"] <= high
    assert final["n_images"] > 0 and final["n_patches"] >= final["n_images"]
    from fedsim.evaluation.schema import check_report_schema

    assert check_report_schema(final) == []  # the keys eval.json has too (tests/test_eval_inputs.py)


def test_metrics_have_per_client_entries_and_ranks_agree(demo_run):
    out, _ = demo_run
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    for record in rounds:
        clients = record["clients"]
        assert sorted(c["hospital"] for c in clients) == ["H1", "H2", "H3"]
        for c in clients:
            assert c["num_samples"] > 0 and c["train_loss"] > 0 and c["drift"] > 0
        # After each aggregation every rank holds the same weights.
        checksums = {tuple(c["weights_checksum"]) for c in clients}
        assert len(checksums) == 1, checksums
        assert record["global"]["samples_aggregated"] == sum(c["num_samples"] for c in clients)


def test_tensorboard_has_every_clients_drift_for_every_round(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo_run
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for hospital in ("H1", "H2", "H3"):
        for figure in (
            "drift",
            "rel_drift",
            "divergence",
            "cosine",
            "train_loss",
            "prox",
            "val_acc_local",
            "val_acc_global",
        ):
            tag = f"client/{hospital}/{figure}"
            assert tag in tags, tag
            assert [e.step for e in events.Scalars(tag)] == [0, 1]
    assert "global/drift_spread" in tags and "global/val_acc" in tags
    assert "global/val_confusion_matrix" in events.Tags()["images"]


def test_gradcam_panels_are_written_per_hospital(demo_run):
    out, _ = demo_run
    for hospital in ("H1", "H2", "H3"):
        panels = sorted((out / "xai" / hospital).glob("*.png"))
        assert panels, hospital
    assert (out / "confusion_matrix.png").is_file()


def test_eval_reads_the_checkpoint(demo_run, tmp_path):
    out, _ = demo_run
    proc = evaluate(out, tmp_path, out.parent / "cache", "--bootstrap", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    from fedsim.evaluation.schema import check_report_schema

    assert check_report_schema(report) == []
    final = json.loads((out / "final.json").read_text())
    assert set(final) - {"hospitals"} <= set(report)  # eval.json has every top-level key final.json has
    for level in ("image", "patch"):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "per_class_recall", "confusion_matrix", "ci95"):
            assert key in report[level], (level, key)
    assert (tmp_path / "confusion_matrix.png").is_file()


def _mean_drift(out) -> float:
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return sum(c["drift"] for c in record["clients"]) / len(record["clients"])


def test_larger_mu_gives_smaller_drift(demo_run, tmp_path):
    # Prepare: the demo run's data cache, same seed, two values of mu; its three hospitals on one process (the
    # proximal term is local to each hospital, and one rank ends where three do: tests/test_hospitals.py)
    out, _ = demo_run
    cache = out.parent / "cache"
    runs = {mu: tmp_path / f"mu{mu}" for mu in (0.0, 2.0)}

    # Execute
    procs = together(
        *[
            lambda mu=mu: train_single(
                [*SMALL, "--rounds", "1", "--num-hospitals", "3", "--mu", str(mu), "--out", str(runs[mu])], cache
            )
            for mu in runs
        ]
    )
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]

    # Assert: the proximal term pulls local weights towards the global model
    assert _mean_drift(runs[2.0]) < _mean_drift(runs[0.0])


def test_crc_hgd_tree_prepared_then_trained(demo_run, tmp_path):
    # Prepare: a CRC-HGD-style tree (class/magnification folders, no manifest, no hospital column)
    import shutil

    out, _ = demo_run
    synthetic = next((out.parent / "cache").glob("synthetic-*"))
    tree = tmp_path / "CRC-HGD"
    for folder in synthetic.glob("CRC_Grade__*"):
        shutil.copytree(folder, tree / folder.name)
    cache = tmp_path / "patches"
    settings = [
        "--set",
        "data.context_size=64",
        "--set",
        "data.detail_size=48",
        "--set",
        "data.context_fov=96",
        "--set",
        "data.patches_per_image=2",
        "--set",
        "data.eval_patches_per_image=2",
    ]
    env = {**os.environ, "FEDSIM_CACHE": str(tmp_path / "fedsim")}

    # Execute: the cache is built ahead, then training on 2 hospitals (iid partition) reads it
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.prepare",
            "--data",
            str(tree),
            "--out",
            str(cache),
            "--hospitals",
            "2",
            "--partition",
            "iid",
            "--context-size",
            "64",
            "--detail-size",
            "48",
            "--context-fov",
            "96",
            "--patches-per-image",
            "2",
            "--eval-patches-per-image",
            "2",
            "--patient-regex",
            r"^(H\d+_P\d+)",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    prepared = sorted(p.name for p in cache.iterdir() if p.is_dir())
    run = ranks(
        [
            *SMALL,
            *settings,
            "--rounds",
            "1",
            "--data",
            str(tree),
            "--partition",
            "iid",
            "--set",
            r'data.patient_regex="^(H\\d+_P\\d+)"',
            "--set",
            f"data.cache_dir={cache}",
            "--out",
            str(tmp_path / "run"),
        ],
        tmp_path / "fedsim",
        nproc=2,
    )

    # Assert: trained on the tree, reusing exactly the prepared folders; splits written
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == prepared
    assert len(prepared) == 6  # 2 hospitals x train/val/test
    splits = (tmp_path / "run" / "splits.csv").read_text().splitlines()
    assert len(splits) == 1 + len(list(tree.rglob("*.jpg")))
    assert (tmp_path / "run" / "data_report.json").is_file()


def test_paper_preset_trains_on_a_tree_without_hospitals_by_default(demo_run, tmp_path):
    # The README's paper command on a CRC-HGD-style tree (no hospital column), with a tiny backbone and small patches
    import shutil

    out, _ = demo_run
    tree = tmp_path / "CRC-HGD"
    for folder in next((out.parent / "cache").glob("synthetic-*")).glob("CRC_Grade__*"):
        shutil.copytree(folder, tree / folder.name)

    run = ranks(
        [
            "--config",
            str(REPO / "configs" / "paper.toml"),
            "--data",
            str(tree),
            *SMALL,
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        tmp_path / "fedsim",
    )

    assert run.returncode == 0, run.stderr[-3000:]
    assert "data.partition = auto: iid (no hospital column: a stratified split into 3 hospitals)" in run.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["partition"] == "iid"
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert sorted(final["per_hospital_accuracy"]) == ["H1", "H2", "H3"]


def _one_hospital(tmp_path, setting: str):
    """One round of one hospital without torchrun, with one extra setting; (run folder, process)."""
    out = tmp_path / "run"
    proc = train_single(
        [
            *SMALL,
            "--rounds",
            "1",
            "--num-hospitals",
            "1",
            "--set",
            setting,
            "--out",
            str(out),
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        tmp_path / "fedsim",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_stain_normalization_on_the_device(tmp_path):
    # The cache keeps raw pixels and every batch is normalized where the model runs.
    out, _ = _one_hospital(tmp_path, "data.stain_on_device=true")
    from fedsim.config import from_dict

    final = json.loads((out / "final.json").read_text())
    assert final["n_images"] > 0
    # eval.py normalizes on the device too: the same test images give the same predictions as in final.json
    evaluated = evaluate(out, tmp_path / "eval", tmp_path / "fedsim", "--bootstrap", "10", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["patch"]["confusion_matrix"] == final["patch"]["confusion_matrix"]
    from data.stain import Macenko
    from fedsim.evaluation.offline import eval_settings

    saved = from_dict(json.loads((out / "config.json").read_text()))
    assert isinstance(eval_settings(saved, torch.device("cpu")).normalizer, Macenko)
    assert eval_settings(from_dict({}), torch.device("cpu")).normalizer is None
    # The cache is the one of an un-normalized run: the same spec, so the same folders.
    from fedsim.datasetup import cache_spec

    on_device = from_dict({"data": {"stain_on_device": True}})
    raw = from_dict({"data": {"stain": "none"}})
    assert cache_spec(on_device, "train") == cache_spec(raw, "train")
    assert cache_spec(on_device, "train") != cache_spec(from_dict({}), "train")


def test_simulated_labs_reach_the_run(tmp_path):
    # data.site_shift gives the hospital its lab before caching; the profiles are logged and saved.
    out, proc = _one_hospital(tmp_path, "data.site_shift=1")
    profiles = json.loads((out / "site_profiles.json").read_text())
    assert list(profiles["hospitals"]) == ["H1"] and profiles["site_shift"] == 1
    assert "site profiles (data.site_shift = 1)" in proc.stderr
    assert json.loads((out / "final.json").read_text())["n_images"] > 0


@pytest.mark.parametrize("hospitals", [3, 1])
def test_centralized_mode_on_two_ranks(demo_run, tmp_path, hospitals):
    # The pooled data of the hospitals, sharded over 2 ranks that average gradients every step; with one
    # hospital, rank 1 caches none of its own and trains on its shard of the pool.
    out_dir = tmp_path / "run"
    proc = ranks(
        [*SMALL, "--rounds", "1", "--mode", "centralized", "--num-hospitals", str(hospitals), "--out", str(out_dir)],
        demo_run[0].parent / "cache",
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"H{k + 1}" for k in range(hospitals)]
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert sorted(c["hospital"] for c in record["clients"]) == names
    assert len({tuple(c["weights_checksum"]) for c in record["clients"]}) == 1
    assert sorted(json.loads((out_dir / "final.json").read_text())["per_hospital_accuracy"]) == names
