"""Grad-CAM maps (models/gradcam.py) and the per-grade overlay panels (fedsim/xai.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data.cache import CachedPairs
from fedsim.xai import slug, write_overlays
from models import DualStreamNet
from models.gradcam import GradCAM, jet_lut, overlay

CLASSES = ["Grade I", "Grade II", "Grade III"]


def _model(scales: str = "dual", seed: int = 0) -> DualStreamNet:
    torch.manual_seed(seed)
    return DualStreamNet("test_resnet", scales, 3, hidden=8).eval()


def _inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 3, 48, 48, generator=g)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _reference_cam(
    feats: list[torch.Tensor], logits: torch.Tensor, target: torch.Tensor, sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """Grad-CAM written out directly from feature maps the test computed itself."""
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    out = []
    for a, g, size in zip(feats, grads, sizes):
        cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        out.append(cam / cam.amax(dim=(1, 2), keepdim=True))
    return out


def test_cams_have_input_size_and_unit_range():
    model = _model()
    context, detail = _inputs()

    with GradCAM(model) as gradcam:
        maps = gradcam.cams(context, detail)

    assert set(maps) == {"context", "detail"}
    assert maps["context"].shape == (2, 64, 64)
    assert maps["detail"].shape == (2, 48, 48)
    for cam in maps.values():
        assert torch.isfinite(cam).all()
        assert cam.min() >= 0 and cam.max() <= 1
        # Normalised per image: each non-zero map peaks at exactly 1.
        peaks = cam.amax(dim=(1, 2))
        assert torch.all((peaks == 0) | torch.isclose(peaks, torch.ones_like(peaks)))


def test_cams_match_a_direct_computation_on_the_last_feature_map():
    # Prepare: the expected maps from forward_features (layer4 of the ResNet) by hand
    model = _model()
    context, detail = _inputs()
    target = torch.tensor([2, 0])
    feats = [model.context.forward_features(context), model.detail.forward_features(detail)]
    logits = model.head(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))
    expected = _reference_cam(feats, logits, target, [(64, 64), (48, 48)])

    # Execute
    with GradCAM(model) as gradcam:
        maps = gradcam.cams(context, detail, target=target)

    # Assert: the same ops on the same feature maps; the gradients come back through timm's pooling instead of a
    # mean, a few ulps apart, which moves a map by ~4 * 2^-24 * sum_k |w_k A_k| / peak ~ 1e-6 (that ratio is ~3 here)
    torch.testing.assert_close(maps["context"], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps["detail"], expected[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scales", ["context", "detail"])
def test_single_stream_model_returns_only_its_stream(scales):
    model = _model(scales)
    context, detail = _inputs()

    with GradCAM(model) as gradcam:
        maps = gradcam.cams(context if scales == "context" else None, detail if scales == "detail" else None)

    assert list(maps) == [scales]
    assert maps[scales].shape == ((2, 64, 64) if scales == "context" else (2, 48, 48))


def test_one_stream_of_a_dual_model_and_unknown_stream():
    model = _model("context")
    with GradCAM(_model(), stream="detail") as gradcam:
        assert list(gradcam.cams(*_inputs())) == ["detail"]
    with pytest.raises(ValueError, match="stream must be one of context"):
        GradCAM(model, stream="detail")


def test_no_parameter_grad_hooks_removed_and_mode_restored():
    # Prepare: a model in train mode, as a training client would hold it
    model = _model().train()
    before = _hook_count(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    context, detail = _inputs()

    # Execute: inside no_grad too, as evaluation code would call it
    gradcam = GradCAM(model)
    during = _hook_count(model)
    with torch.no_grad():
        maps = gradcam.cams(context, detail)
    gradcam.close()

    # Assert
    assert during > before
    assert _hook_count(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    # Computed in eval mode: BatchNorm running statistics (averaged by the federation) unchanged.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, buffers[key], msg=key)
    assert maps["context"].requires_grad is False
    with pytest.raises(RuntimeError, match="closed"):
        gradcam.cams(context, detail)


def test_cam_depends_on_the_target_class():
    model = _model()
    context, detail = _inputs(batch=1)

    with GradCAM(model) as gradcam:
        first = gradcam.cams(context, detail, target=torch.tensor([0]))
        second = gradcam.cams(context, detail, target=torch.tensor([1]))

    assert first["context"].amax() > 0 and second["context"].amax() > 0
    assert not torch.allclose(first["context"], second["context"], atol=1e-3)
    assert not torch.allclose(first["detail"], second["detail"], atol=1e-3)


def test_default_target_is_the_predicted_class():
    model = _model()
    context, detail = _inputs()
    predicted = model(context, detail).argmax(dim=1)

    with GradCAM(model) as gradcam:
        default = gradcam.cams(context, detail)
        explicit = gradcam.cams(context, detail, target=predicted)
        with pytest.raises(ValueError, match="target classes"):
            gradcam.cams(context, detail, target=torch.tensor([0, 3]))

    torch.testing.assert_close(default["context"], explicit["context"])


def test_map_without_evidence_stays_zero():
    # A zero last layer makes every logit constant: all gradients, hence all maps, vanish.
    model = _model()
    nn.init.zeros_(model.head[-1].weight)

    with GradCAM(model) as gradcam:
        maps = gradcam.cams(*_inputs())

    for cam in maps.values():
        assert torch.isfinite(cam).all()
        assert torch.count_nonzero(cam) == 0


def test_backbone_without_global_pool_uses_last_spatial_output():
    # Prepare: a plain conv stream (no timm global_pool) with the head's expected width
    model = _model()
    conv = nn.Conv2d(3, model.context.num_features, 3, stride=4, padding=1)
    model.context = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    context, detail = _inputs()
    target = torch.tensor([1, 2])
    feats = [F.relu(conv(context)), model.detail.forward_features(detail)]
    logits = model.head(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))
    expected = _reference_cam(feats, logits, target, [(64, 64), (48, 48)])
    before = _hook_count(model)

    # Execute
    with GradCAM(model) as gradcam:
        maps = gradcam.cams(context, detail, target=target)

    # Assert: the ReLU's map, not the 1x1 pooled one
    torch.testing.assert_close(maps["context"], expected[0], atol=1e-5, rtol=1e-4)
    assert _hook_count(model) == before


def test_overlay_blends_a_jet_heat_map():
    image = np.full((20, 30, 3), 128, dtype=np.uint8)
    cam = np.zeros((20, 30), dtype=np.float32)
    cam[:, 15:] = 1.0

    out = overlay(image, cam, alpha=0.5)

    assert out.dtype == np.uint8 and out.shape == image.shape
    lut = jet_lut()
    assert lut[0, 2] > lut[0, 0] and lut[-1, 0] > lut[-1, 2]  # cold is blue, hot is red
    assert out[0, 0, 2] > out[0, 0, 0]
    assert out[0, -1, 0] > out[0, -1, 2]
    np.testing.assert_array_equal(overlay(image, cam, alpha=0.0), image)
    assert overlay(image, np.ones((5, 5)), alpha=0.5).shape == image.shape


def _write_cache(folder: Path, labels: list[int]) -> CachedPairs:
    """A tiny cached split: textured uint8 patches and their patches.json."""
    rng = np.random.default_rng(0)
    n = len(labels)
    folder.mkdir()
    np.save(folder / "context.npy", rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))
    np.save(folder / "detail.npy", rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8))
    patches = [
        {"image": i, "path": f"img{i}.png", "label": k, "magnification": "20x", "patient": "p", "hospital": "H1"}
        for i, k in enumerate(labels)
    ]
    (folder / "patches.json").write_text(json.dumps({"count": n, "patches": patches}))
    return CachedPairs([folder])


class _FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step):
        self.images.append((tag, image, step))


def test_write_overlays_writes_png_panels_per_grade(tmp_path):
    # Prepare
    dataset = _write_cache(tmp_path / "cache", [0, 1, 0, 0, 2])
    model = _model()
    writer = _FakeWriter()
    out = tmp_path / "xai"

    # Execute
    paths = write_overlays(model, dataset, out, CLASSES, "cpu", per_grade=2, writer=writer, step=7)

    # Assert: the first two of grade I, the only ones of II and III
    names = ["grade-i_1", "grade-i_2", "grade-ii_1", "grade-iii_1"]
    assert paths == [out / f"{n}.png" for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)  # no temp files left
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            assert img.height > 64 and img.width >= 64 + 64
    assert [t for t, _, _ in writer.images] == [f"xai/H1/{n}" for n in names]
    tag, chw, step = writer.images[0]
    assert chw.dtype == np.uint8 and chw.shape[0] == 3 and step == 7
    assert all(p.grad is None for p in model.parameters())


def test_write_overlays_single_stream_and_slug(tmp_path):
    dataset = _write_cache(tmp_path / "cache", [2, 2, 2])

    paths = write_overlays(_model("detail"), dataset, tmp_path / "xai", CLASSES, torch.device("cpu"), per_grade=1)

    assert [p.name for p in paths] == ["grade-iii_1.png"]
    with Image.open(paths[0]) as img:
        assert img.height > 48
    assert slug("Grade II (moderately differentiated)") == "grade-ii-moderately-differentiated"


class _Recorder:
    """A stand-in stain normalizer: records what it saw, returns the negative image."""

    def __init__(self):
        self.shapes = []

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(batch.shape))
        return 255 - batch


def test_explain_shows_and_runs_what_the_normalizer_returns(tmp_path):
    # data.stain_on_device: the cache holds raw pixels, the model sees them normalized, and so do the panels
    from fedsim.xai import _explain

    dataset = _write_cache(tmp_path / "cache", [0, 1])
    model = _model()
    recorder = _Recorder()
    images, probs, _ = _explain(model, dataset, [0, 1], "cpu", normalizer=recorder)
    raw_context, raw_detail, _, _ = dataset.__getitems__([0, 1])
    assert recorder.shapes == [tuple(raw_context.shape), tuple(raw_detail.shape)]
    assert np.array_equal(images["context"], (255 - raw_context).permute(0, 2, 3, 1).numpy())
    _, plain, _ = _explain(model, dataset, [0, 1], "cpu")
    assert not np.allclose(probs, plain)
