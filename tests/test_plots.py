"""Tests for fedsim.plots: the confusion matrix picture and the Grad-CAM panel layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fedsim.plots import compose_panel, confusion_matrix_image, load_font, save_confusion_matrix_png

NAMES = ["Grade I", "Grade II", "Grade III"]
WORKED_CM = np.array([[5, 2, 1], [1, 6, 1], [0, 2, 4]])


def test_save_confusion_matrix_png(tmp_path) -> None:
    # Prepare
    path = tmp_path / "plots" / "cm.png"

    # Execute
    save_confusion_matrix_png(WORKED_CM, NAMES, path, title="worked example")
    save_confusion_matrix_png(WORKED_CM, NAMES, path)  # overwrite in place

    # Assert
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert 200 <= image.width <= 2000 and 200 <= image.height <= 2000
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    # Shaded cells plus text: far more than a blank or two-tone image.
    assert colours is not None and len(colours) > 10
    # Nothing but the PNG is left behind (no temporary files).
    assert os.listdir(path.parent) == ["cm.png"]


def test_save_confusion_matrix_png_shades_by_row_fraction(tmp_path) -> None:
    # Prepare: a diagonal matrix (each diagonal cell 100% of its row) vs an empty one.
    full, empty = tmp_path / "full.png", tmp_path / "empty.png"

    # Execute
    save_confusion_matrix_png(np.eye(3, dtype=int) * 4, NAMES, full)
    save_confusion_matrix_png(np.zeros((3, 3), dtype=int), NAMES, empty)

    # Assert: same layout, but the diagonal version is darker overall.
    with Image.open(full) as a, Image.open(empty) as b:
        assert a.size == b.size
        assert np.asarray(a.convert("L")).mean() < np.asarray(b.convert("L")).mean() - 5


def test_save_confusion_matrix_png_rejects_wrong_names(tmp_path) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="class names"):
        save_confusion_matrix_png(WORKED_CM, ["a", "b"], tmp_path / "x.png")
    assert not os.listdir(tmp_path)


def test_confusion_matrix_image_is_what_the_png_holds(tmp_path) -> None:
    # Prepare
    path = tmp_path / "cm.png"

    # Execute: the TensorBoard image and the file come from the same drawing
    image = np.asarray(confusion_matrix_image(WORKED_CM, NAMES, title="t"))
    save_confusion_matrix_png(WORKED_CM, NAMES, path, title="t")

    # Assert
    with Image.open(path) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), image)


def test_panel_puts_tiles_side_by_side_above_the_caption() -> None:
    # Prepare: a 64 px and a 32 px tile; the smaller one is scaled to the common height
    tiles = [("context", np.zeros((64, 64, 3), np.uint8)), ("detail", np.full((32, 32, 3), 200, np.uint8))]

    # Execute
    panel = compose_panel(tiles, "p=0.90")

    # Assert: 64 + gap + 64 wide (the caption is shorter), a white caption strip below the tiles
    assert panel.dtype == np.uint8 and panel.shape[1] == 64 + 4 + 64 and panel.shape[0] > 64
    assert (panel[:, 64:68] == 255).all()  # the gap between the tiles
    assert (panel[40:64, 80:] == 200).all() and panel[64:].min() < 255  # scaled tile; caption text


def test_one_font_loader_caches_each_size() -> None:
    # Execute / Assert
    assert load_font(12) is load_font(12)
