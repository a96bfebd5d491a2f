"""Weights and checkpoints that do not fit are one line (exit code 2), and eval.json has final.json's keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsim.config import from_dict
from fedsim.evaluation.levels import summaries
from fedsim.evaluation.schema import REPORT_KEYS, check_report_schema, headline
from models import build_model, load_pretrained

CLASSES = ["Grade I", "Grade II", "Grade III"]
TINY = {
    "data": {
        "synthetic": {"image_size": 256, "patients_per_grade": 3, "images_per_patient": 2},
        "context_size": 64,
        "detail_size": 48,
        "context_fov": 96,
        "patches_per_image": 2,
        "eval_patches_per_image": 2,
    },
    "model": {"backbone": "test_resnet", "hidden": 16},
    "train": {"device": "cpu"},
}


def _tree(**model) -> dict:
    return {**TINY, "model": {**TINY["model"], **model}}


def fake_checkpoint(path, model_tree: dict | None = None, weights_of: dict | None = None, drop=()) -> None:
    """A checkpoint shaped like Federation._checkpoint's: config of ``model_tree``, weights of ``weights_of``."""
    cfg = from_dict({**_tree(**(model_tree or {})), "out": str(path.parent)})
    built = from_dict({**_tree(**(weights_of or model_tree or {})), "out": str(path.parent)}).model
    torch.manual_seed(0)
    model = build_model(built.backbone, built.scales, len(CLASSES), built.hidden)
    state = {
        "model": model.state_dict(),
        "round": 0,
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
        "class_names": list(CLASSES),
        "hospitals": ["H1", "H2", "H3"],
    }
    for key in drop:
        state.pop(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def run_eval(capfd, *args: str) -> tuple[int, list[str]]:
    import eval as eval_cli

    code = eval_cli.main(["--device", "cpu", "--bootstrap", "20", *args])
    return code, capfd.readouterr().err.strip().splitlines()


# ---- pretrained weights --------------------------------------------------------------------


def test_backbone_weights_of_another_architecture_are_one_line(tmp_path):
    # Prepare: resnet10t's backbone weights, loaded into test_resnet streams
    import timm

    path = tmp_path / "resnet10t.pt"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), path)
    model = build_model("test_resnet", num_classes=3, hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # Execute
    with pytest.raises(ValueError) as info:
        load_pretrained(model, path)

    # Assert: keys and shapes named, with counts; nothing half-loaded
    text = str(info.value)
    assert "\n" not in text
    assert f"pretrained weights {path} does not fit the test_resnet backbone" in text
    assert "missing keys (layer3.0.conv3.weight" in text
    assert "shape mismatches (conv1.0.weight: saved (24, 3, 3, 3) vs model (16, 3, 3, 3)" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_build_model_with_weights_of_another_backbone_is_one_line(tmp_path):
    import timm

    path = tmp_path / "test_resnet.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"does not fit the resnet10t backbone: \d+ unexpected \(layer3\.0\."):
        build_model("resnet10t", num_classes=3, hidden=8, pretrained=str(path))


def test_dual_stream_weights_of_another_model_are_one_line(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(build_model("test_resnet", num_classes=3, hidden=8).state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_pretrained(build_model("test_resnet", num_classes=3, hidden=16), path)
    text = str(info.value)
    assert (
        "does not fit a dual-stream test_resnet model: 3 shape mismatches (head.0.weight: saved (8, 192) vs model "
        "(16, 192)"
        in text
        and "\n" not in text
    )
    with pytest.raises(ValueError, match=r"does not fit a detail-stream test_resnet model: \d+ unexpected \(context\."):
        load_pretrained(build_model("test_resnet", "detail", num_classes=3, hidden=8), path)


def test_unreadable_weights_are_one_line(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00not a torch file" * 20)
    with pytest.raises(ValueError) as info:
        load_pretrained(build_model("test_resnet", num_classes=3, hidden=8), path)
    assert f"{path} cannot be read as weights" in str(info.value) and "\n" not in str(info.value)


def test_whole_model_weights_that_fit_load(tmp_path):
    torch.manual_seed(3)
    saved = build_model("test_resnet", num_classes=3, hidden=8)
    path = tmp_path / "whole.pt"
    torch.save({"model": saved.state_dict()}, path)
    model = build_model("test_resnet", num_classes=3, hidden=8, pretrained=str(path))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved.state_dict()[key])


# ---- eval.py on checkpoints that do not fit ------------------------------------------------


@pytest.mark.parametrize(
    "model_tree, weights_of, drop, message",
    [
        (
            {"backbone": "resnet10t"},
            {"backbone": "test_resnet"},
            (),
            "does not fit the dual-stream resnet10t model of its config (3 classes, hidden 16): ",
        ),
        ({"hidden": 32}, {"hidden": 16}, (), "shape mismatches (head.0.weight: saved (16, 192) vs model (32, 192)"),
        ({"scales": "detail"}, {"scales": "dual"}, (), "unexpected (context."),
        ({}, None, ("config",), "lacks config: not a checkpoint written by train.py"),
        ({}, None, ("class_names",), "lacks class_names"),
        ({}, None, ("config", "class_names"), "lacks config and class_names"),
        (
            {"backbone": "resnet_nope"},
            {"backbone": "test_resnet"},
            (),
            "model.backbone = 'resnet_nope' is not a timm model",
        ),
    ],
)
def test_eval_refuses_a_checkpoint_that_does_not_fit(tmp_path, capfd, model_tree, weights_of, drop, message):
    # Prepare
    path = tmp_path / "run" / "checkpoint.pt"
    if model_tree.get("backbone") == "resnet_nope":
        fake_checkpoint(path, {}, weights_of)
        state = torch.load(path, weights_only=True)
        state["config"]["model"]["backbone"] = "resnet_nope"
        torch.save(state, path)
    else:
        fake_checkpoint(path, model_tree, weights_of, drop)

    # Execute
    code, err = run_eval(capfd, "--checkpoint", str(path), "--out", str(tmp_path / "eval"))

    # Assert
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"eval.py: error: checkpoint {path}") and message in err[0]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "eval").exists()  # refused before any work


@pytest.mark.parametrize(
    "config_backbone, weights_backbone, keys",
    [
        ("resnet10t", "test_resnet", "12 unexpected (context.layer3.0.conv3.weight, context.layer3.0.bn3.weight, "),
        ("test_resnet", "resnet10t", "12 missing keys (context.layer3.0.conv3.weight, context.layer3.0.bn3.weight, "),
    ],
)
def test_eval_names_the_keys_and_shapes_of_another_backbone(tmp_path, capfd, config_backbone, weights_backbone, keys):
    path = tmp_path / "checkpoint.pt"
    fake_checkpoint(path, {"backbone": config_backbone}, {"backbone": weights_backbone})
    code, err = run_eval(capfd, "--checkpoint", str(path))
    assert code == 2 and len(err) == 1
    assert keys in err[0]
    small, large = ("16", "24") if config_backbone == "resnet10t" else ("24", "16")
    assert (
        f"141 shape mismatches (context.conv1.0.weight: saved ({small}, 3, 3, 3) vs model ({large}, 3, 3, 3), "
        in err[0]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "checkpoint not found"),
        (bytes(range(256)) * 8, "is corrupt or truncated"),
        (b"PK\x03\x04" + b"\x00" * 100, "is corrupt or truncated"),
    ],
)
def test_eval_refuses_a_missing_or_corrupt_checkpoint(tmp_path, capfd, content, message):
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    code, err = run_eval(capfd, "--checkpoint", str(path))
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("eval.py: error: ") and message in err[0] and str(path) in err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--bootstrap", "-1"], "--bootstrap -1 must be 0"),
        (["--data", "/nonexistent/crc"], "--data /nonexistent/crc: data path does not exist"),
    ],
)
def test_eval_refuses_bad_options_before_reading_the_checkpoint(tmp_path, capfd, args, message):
    code, err = run_eval(capfd, "--checkpoint", str(tmp_path / "none.pt"), *args)
    assert code == 2 and len(err) == 1 and message in err[0]


# ---- the report schema ---------------------------------------------------------------------


class _Split:
    """What summaries() reads of a dataset: the metadata of every patch pair."""

    def __init__(self, hospital: str, n_images: int, rng: np.random.Generator):
        self.meta = [
            {
                "image": f"{hospital}-{i}",
                "label": i % 3,
                "magnification": ("10x", "20x")[i % 2],
                "hospital": hospital,
                "patient": f"{hospital}-p{i // 2}",
            }
            for i in range(n_images)
            for _ in (0, 1)
        ]  # two patch pairs per image
        self.labels = np.asarray([m["label"] for m in self.meta])
        self.probs = rng.dirichlet(np.ones(3), size=len(self.meta))


def test_report_schema_holds_for_eval_and_final_reports():
    from fedsim.evaluation.levels import final_report

    rng = np.random.default_rng(0)
    splits = [_Split(h, 9, rng) for h in ("H1", "H2")]
    idx = lambda s: np.arange(len(s.meta))  # noqa: E731

    # eval.json's content: summaries of one dataset with the headline figures
    report = headline(summaries(splits[0], splits[0].probs, splits[0].labels, idx(splits[0]), CLASSES, 20, 0))
    assert check_report_schema(report) == []
    assert report["accuracy"] == report["image"]["accuracy"] and report["n_images"] == 9 and report["n_patches"] == 18
    assert report["per_hospital_accuracy"] == report["image"]["per_hospital_accuracy"]

    # final.json's content: per-hospital counts pooled
    per_hospital = [
        {"hospital": s.meta[0]["hospital"], **summaries(s, s.probs, s.labels, idx(s), CLASSES, 20, 0, counts=True)}
        for s in splits
    ]
    final = json.loads(json.dumps(final_report(per_hospital, CLASSES)))
    assert check_report_schema(final) == []
    assert set(final["per_hospital_accuracy"]) == {"H1", "H2"}


def test_report_schema_names_what_is_missing():
    assert check_report_schema({}) == list(REPORT_KEYS)
    assert check_report_schema([]) == list(REPORT_KEYS)
    partial = {"image": {"n": 1, "ci95": {"accuracy": [0, 1]}}, "patch": {}, "accuracy": 1.0}
    missing = check_report_schema(partial)
    assert "n_images" in missing and "per_hospital_accuracy" in missing
    assert "image.qwk" in missing and "image.n_images" in missing and "image.ci95.qwk" in missing
    assert "image.n" not in missing and "image.ci95.accuracy" not in missing
    assert "patch.n_patches" in missing and "patch.confusion_matrix" in missing


def test_eval_json_has_the_top_level_keys_of_final_json(tmp_path, capfd, monkeypatch):
    # Prepare: a checkpoint of random tiny weights on the embedded synthetic data (rendered into tmp_path)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "run" / "checkpoint.pt"
    fake_checkpoint(path)

    # Execute
    code, err = run_eval(capfd, "--checkpoint", str(path), "--out", str(tmp_path / "eval"))

    # Assert
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert check_report_schema(report) == []
    assert report["accuracy"] == report["image"]["accuracy"]
    assert report["n_images"] == report["image"]["n"] and report["n_patches"] == report["patch"]["n"]
    assert report["per_hospital_accuracy"] == report["image"]["per_hospital_accuracy"]
    assert set(report["per_hospital_accuracy"]) == {"H1", "H2", "H3"}
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
