"""Dual/single-stream output shapes; the real ResNetRS50 is built once to check its shapes."""

from __future__ import annotations

import pytest
import torch

from models import DualStreamNet, build_model, check_backbone, load_pretrained


@pytest.mark.parametrize("scales, streams", [("dual", 2), ("context", 1), ("detail", 1)])
def test_output_shapes(scales, streams):
    # Prepare
    model = build_model("test_resnet", scales=scales, num_classes=3, hidden=16).eval()
    context, detail = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 48, 48)

    # Execute
    logits = model(context, detail)
    probs = model.predict_proba(context, detail)

    # Assert
    assert logits.shape == (2, 3)
    assert len(model.streams) == streams
    assert model.head[0].in_features == streams * getattr(model, model.streams[0]).num_features
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_single_stream_ignores_the_other_input():
    model = build_model("test_resnet", scales="detail", num_classes=3, hidden=8).eval()
    torch.testing.assert_close(
        model(None, torch.ones(1, 3, 32, 32)), model(torch.zeros(1, 3, 9, 9), torch.ones(1, 3, 32, 32))
    )


def test_resnetrs50_dual_stream_shapes():
    # The real backbone: 2048 features per stream, 4096 into the head.
    model = DualStreamNet("resnetrs50", "dual", num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 320, 320), torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 3)
    assert model.head[0].in_features == 4096


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_small_cnn_keeps_full_resolution_until_its_first_pooling(norm):
    # fedsim's own backbone: both convolutions before the first pooling see every pixel of the patch.
    check_backbone("small_cnn")
    model = build_model("small_cnn", scales="dual", num_classes=3, hidden=8, norm=norm).eval()
    stem = model.detail.features
    first_pool = next(i for i, m in enumerate(stem) if isinstance(m, torch.nn.MaxPool2d))
    with torch.no_grad():
        assert stem[:first_pool](torch.zeros(1, 3, 48, 48)).shape[-2:] == (48, 48)
        assert model(torch.randn(2, 3, 48, 48), torch.randn(2, 3, 48, 48)).shape == (2, 3)
    norms = {type(m) for m in stem if not isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d))}
    assert norms == {torch.nn.GroupNorm if norm == "group" else torch.nn.BatchNorm2d}
    assert model.head[0].in_features == 2 * model.detail.num_features == 128


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm model"):
        check_backbone("resnet_does_not_exist")


@pytest.mark.parametrize("backbone_name", ["test_resnet", "test_convnext"])
def test_pretrained_backbone_weights_load_into_both_streams(tmp_path, backbone_name):
    # Prepare: a backbone state dict saved locally (nothing is downloaded), classifier included; ConvNeXt keeps
    # it under "head." (head.norm, head.fc), which must not pass for a whole dual-stream model
    import timm

    torch.manual_seed(1)
    backbone = timm.create_model(backbone_name, pretrained=False)
    path = tmp_path / "backbone.pt"
    torch.save(backbone.state_dict(), path)
    model = build_model(backbone_name, num_classes=3, hidden=8)

    # Execute
    load_pretrained(model, path)

    # Assert: every tensor of both streams comes from the file
    for stream in (model.context, model.detail):
        for key, value in stream.state_dict().items():
            torch.testing.assert_close(value, backbone.state_dict()[key])
