"""The embedded benchmark as a run's data: patch centres inside the tile, held-out hospitals, the settings
the benchmark needs, and the settings added later that leave earlier run folders' digests alone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pytest

from data.benchmark.design import HELDOUT, centre_box, preset
from data.cache import CACHE_VERSION, CacheSpec
from data.patches import NoTissue, PatchSpec, extract_pairs, inside_box, sample_centres
from data.records import ImageRecord
from fedsim.config import ConfigError, RunConfig, check_inputs, resolve, save
from fedsim.datasetup import hold_out
from fedsim.sources import benchmark_settings, check_benchmark_settings

REPO_CONFIGS = "configs/benchmark-{}.toml"


# ---- patch centres inside the image --------------------------------------------------------------------


@pytest.mark.parametrize("fov, detail, side", [(128, 32, 144), (192, 48, 216), (320, 224, 800), (7, 3, 7)])
def test_inside_centres_keep_both_windows_inside(fov, detail, side):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    spec = PatchSpec(context_size=fov, detail_size=detail, context_fov=fov, min_tissue=0.0, centres="inside")
    centres = sample_centres(rgb, 200, spec, rng, mask=np.ones((side, side), bool))
    low, high = fov // 2, side - (fov - fov // 2)
    assert centres.min() >= low and centres.max() <= high
    rows, cols = inside_box(rgb.shape, spec)
    assert (rows.start, rows.stop - 1, cols.start, cols.stop - 1) == (low, high, low, high)
    contexts, details = extract_pairs(rgb, centres, spec)
    for (r, c), context, det in zip(centres, contexts, details):  # no mirrored pixel: the plain crops
        assert np.array_equal(context, rgb[r - fov // 2 : r - fov // 2 + fov, c - fov // 2 : c - fov // 2 + fov])
        top = r - detail // 2
        assert np.array_equal(det, rgb[top : top + detail, c - detail // 2 : c - detail // 2 + detail])


def test_the_benchmark_box_is_the_patch_samplers_box():
    for name in ("demo", "study", "paper"):
        spec = preset(name)
        patch = PatchSpec(spec.context, spec.detail, spec.context_fov, 0.0, "inside")
        rows, _ = inside_box((spec.tile_size, spec.tile_size), patch)
        assert (rows.start, rows.stop - 1) == centre_box(spec)


def test_inside_refuses_an_image_smaller_than_the_window_and_tissue_out_of_reach():
    spec = PatchSpec(context_size=64, detail_size=16, context_fov=64, min_tissue=0.5, centres="inside")
    with pytest.raises(NoTissue, match="smaller than the 64 px window"):
        sample_centres(np.zeros((40, 80, 3), np.uint8), 1, spec, np.random.default_rng(0), mask=np.ones((40, 80), bool))
    mask = np.zeros((100, 100), bool)
    mask[:6, :6] = True  # tissue only in a corner no window centre inside the image reaches
    with pytest.raises(NoTissue, match="no tissue where the windows fit"):
        sample_centres(np.zeros((100, 100, 3), np.uint8), 1, spec, np.random.default_rng(0), mask=mask)
    with pytest.raises(ValueError, match="patch centres must be one of tissue, inside"):
        PatchSpec(centres="middle")


def test_tissue_centres_are_as_before_and_keep_the_cache_key():
    spec = PatchSpec(context_size=64, detail_size=16, context_fov=64)
    cache = CacheSpec(spec, 2)
    old_fields = asdict(cache)
    del old_fields["patch"]["centres"]
    record = ImageRecord("/nowhere/a.jpg", 0, patient="P", hospital="H1", split="train")
    expected = hashlib.sha256(json.dumps([CACHE_VERSION, old_fields, None], sort_keys=True).encode())
    expected.update(json.dumps([*record.__dict__.values(), None]).encode() + b"\n")
    assert cache.digest([record]) == expected.hexdigest()[:16]
    inside = CacheSpec(PatchSpec(64, 16, 64, 0.5, "inside"), 2)
    assert inside.digest([record]) != cache.digest([record])


# ---- settings added later ---------------------------------------------------------------------------------


def test_settings_added_later_are_left_out_at_their_default_only(tmp_path):
    base = RunConfig()
    assert "source" not in base.record()["data"] and "benchmark" not in base.record()["data"]
    assert "heldout_hospitals" not in base.record()["data"] and "patch_centres" not in base.record()["data"]
    assert base.to_dict()["data"]["source"] == "synthetic"  # the checkpoint's full view keeps them
    changed = {
        "data.source": "benchmark",
        "data.heldout_hospitals": ["H9"],
        "data.patch_centres": "inside",
        "data.benchmark.test_seed": 3,
    }
    for key, value in changed.items():
        cfg = resolve(None, [(key, value)])
        assert cfg.digest() != base.digest(), key
        save(cfg, tmp_path / "config.json")
        tree = json.loads((tmp_path / "config.json").read_text())
        for part in key.split("."):
            tree = tree[part]
        assert tree == value
    cfg = resolve(None, [("data.benchmark.test_seed", 3)])
    assert cfg.record()["data"]["benchmark"] == {"test_seed": 3}  # the others of the table stay out


def test_heldout_names_must_be_distinct():
    with pytest.raises(ConfigError, match="distinct hospitals"):
        resolve(None, [("data.heldout_hospitals", ["H1", "H1"])])


# ---- what the benchmark needs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "study", "paper"])
def test_the_benchmark_configs_fit_their_preset(name):
    cfg = resolve(REPO_CONFIGS.format(name), [])
    assert cfg.data.source == "benchmark" and cfg.data.benchmark.preset == name
    check_benchmark_settings(cfg)
    check_inputs(cfg)
    for key, value in benchmark_settings(preset(name)).items():
        assert getattr(cfg.data, key.split(".", 1)[1]) == value


def test_a_setting_that_breaks_the_design_is_named():
    cfg = resolve(REPO_CONFIGS.format("demo"), [("data.detail_size", 48), ("data.heldout_hospitals", [])])
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg)
    text = str(err.value)
    assert "data.detail_size = 32 (not 48)" in text and f"holding {HELDOUT!r}" in text
    assert "configs/benchmark-demo.toml" in text and "\n" not in text


# ---- held-out hospitals ----------------------------------------------------------------------------------


def _records():
    out = []
    for h in ("H1", "H2", "HX"):
        for i, split in enumerate(("train", "val", "test")):
            out += [ImageRecord(f"/d/{h}{split}.jpg", i, patient=f"{h}-{split}", hospital=h, split=split)]
    return out


def test_hold_out_keeps_the_test_images_of_the_named_hospitals_apart():
    cfg = resolve(None, [("data.heldout_hospitals", ["HX"])])
    kept, held = hold_out(cfg, _records())
    assert {r.hospital for r in kept} == {"H1", "H2"} and len(kept) == 6
    assert [(r.hospital, r.split) for r in held] == [("HX", "test")]
    assert hold_out(RunConfig(), _records()) == (_records(), [])


def test_hold_out_refuses_unknown_and_testless_hospitals():
    with pytest.raises(ConfigError, match="'H7', which is not a hospital of the data"):
        hold_out(resolve(None, [("data.heldout_hospitals", ["H7"])]), _records())
    records = [r for r in _records() if not (r.hospital == "HX" and r.split == "test")]
    with pytest.raises(ConfigError, match="'HX' has no test images"):
        hold_out(resolve(None, [("data.heldout_hospitals", ["HX"])]), records)


# ---- a run on the benchmark ---------------------------------------------------------------------------------


def test_a_federated_run_on_the_benchmark_reports_the_heldout_hospital_apart(tmp_path):
    from conftest import evaluate, ranks

    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["--config", "configs/benchmark-demo.toml", "--rounds", "1", "--out", str(out)]
    proc = ranks(args, cache, nproc=2)  # 3 hospitals on 2 ranks; rank 0 also hosts the held-out one
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert list(final["per_hospital_accuracy"]) == ["H1", "H2", "H3"]
    assert final["n_images"] == 81 and final["heldout"]["n_images"] == 27  # 27 test tiles each: no tile skipped
    assert list(final["heldout"]["per_hospital_accuracy"]) == [HELDOUT]
    assert final["heldout_accuracy"] == final["heldout"]["accuracy"]
    assert "held out" in proc.stderr
    for hospital in ("H1", "H2", "H3", HELDOUT):  # each hospital's answers stay in its own folder
        rows = (out / "hospitals" / hospital / "predictions.csv").read_text().splitlines()
        assert rows[0] == "name,path,patient,label,prediction" and len(rows) == 28
        assert all(row.split(",")[0].startswith(f"{hospital}_test_") for row in rows[1:])
    splits = (out / "splits.csv").read_text()
    assert splits.count(f"{HELDOUT}") >= 27 and f"{HELDOUT}_train" not in splits
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["source"] == "benchmark" and saved["data"]["heldout_hospitals"] == [HELDOUT]
    evaluated = evaluate(out, tmp_path / "eval", cache, "--split", "test")  # eval.py finds the same benchmark
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["n_images"] == 81 + 27
