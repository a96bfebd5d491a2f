"""Every picture of the project, drawn with Pillow: confusion matrices, the study chart, the cross-site
heatmap, Grad-CAM panels.

All of them share one font loader and one PNG writer. Pillow is imported
inside the functions, so importing this module costs nothing until a picture
is drawn. PNG files are written atomically (:func:`data.files.write_with`):
a reader never sees half an image.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from data.files import write_with
from fedsim.evaluation.scores import as_confusion_matrix

__all__ = [
    "compose_panel",
    "confusion_matrix_image",
    "load_font",
    "heatmap_image",
    "save_confusion_matrix_png",
    "save_heatmap_png",
    "save_png",
    "save_study_chart",
    "study_chart",
]

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (90, 90, 90)

#: {group: {variant: {metric key: (n, mean, CI half-width)}}}: what the study chart shows.
StudyTable = dict[str, dict[str, dict[str, tuple[int, float, float]]]]


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #
@functools.cache
def load_font(size: int) -> Any:
    """Pillow's built-in font at ``size`` px, so no font file has to be installed.

    The font is scalable on Pillow >= 10.1 with FreeType; older or FreeType-less
    Pillows only have one bitmap size, which is used instead. Fonts are cached
    because building the scalable one decodes it each time.
    """
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # TypeError: Pillow < 10.1; ImportError: built without FreeType
        return ImageFont.load_default()


def text_size(draw: Any, text: str, font: Any) -> tuple[int, int]:
    """Width and height in pixels of ``text`` drawn with ``font``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _measuring_draw() -> Any:
    """A drawing context on a 1x1 image, for measuring text before the canvas size is known."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def save_png(image: Any, path: str | os.PathLike) -> None:
    """Write a Pillow image, or a uint8 HxWx3 array, as a PNG file atomically.

    Raises:
        data.files.WriteError: The disk is full or the folder cannot be written (one line).
    """
    if isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    write_with(path, lambda fh: image.save(fh, format="PNG"))


# --------------------------------------------------------------------------- #
# Confusion matrix
# --------------------------------------------------------------------------- #
def _shade(value: float) -> tuple[int, int, int]:
    """Colour for a row-normalised value: white at 0, dark blue at 1."""
    low, high = np.array(WHITE), np.array([8, 48, 107])
    return tuple(int(c) for c in np.rint(low + (high - low) * value))


def _draw_centered(draw: Any, box: tuple[int, int, int, int], lines: list[tuple[str, Any]], fill) -> None:
    """Draw ``(text, font)`` lines stacked and centred inside ``box`` = (x0, y0, x1, y1)."""
    sizes = [text_size(draw, text, font) for text, font in lines]
    gap = 4
    y = (box[1] + box[3] - sum(h for _, h in sizes) - gap * (len(lines) - 1)) / 2
    for (text, font), (w, h) in zip(lines, sizes):
        draw.text(((box[0] + box[2] - w) / 2, y), text, font=font, fill=fill, anchor="lt")
        y += h + gap


def _draw_cells(draw: Any, m: np.ndarray, origin: tuple[int, int], cell: int, fonts: tuple[Any, Any]) -> None:
    """Shade and label every cell with its count and row percentage."""
    totals = m.sum(axis=1)
    for i, j in np.ndindex(*m.shape):
        frac = m[i, j] / totals[i] if totals[i] > 0 else 0.0
        x0, y0 = origin[0] + j * cell, origin[1] + i * cell
        box = (x0, y0, x0 + cell, y0 + cell)
        draw.rectangle(box, fill=_shade(frac), outline=GREY)
        pct = f"{100 * frac:.1f}%" if totals[i] > 0 else "n/a"
        text_fill = WHITE if frac > 0.5 else BLACK
        _draw_centered(draw, box, [(str(int(m[i, j])), fonts[0]), (pct, fonts[1])], text_fill)


def _draw_vertical_text(image: Any, text: str, font: Any, center: tuple[int, int]) -> None:
    """Paste ``text`` rotated 90 degrees counter-clockwise, centred at ``center``."""
    from PIL import Image, ImageDraw

    w, h = text_size(ImageDraw.Draw(image), text, font)
    label = Image.new("RGB", (w + 4, h + 4), WHITE)
    ImageDraw.Draw(label).text((2, 2), text, font=font, fill=BLACK, anchor="lt")
    label = label.rotate(90, expand=True)
    image.paste(label, (center[0] - label.width // 2, center[1] - label.height // 2))


def _render_confusion_matrix(m: np.ndarray, class_names: Sequence[str], title: str) -> Any:
    """Lay out the figure: title, y-axis ("true") on the left, x-axis ("predicted") below."""
    from PIL import Image, ImageDraw

    font, small = load_font(16), load_font(14)
    probe = _measuring_draw()
    name_w = max(text_size(probe, n, font)[0] for n in class_names)
    line_h = text_size(probe, "Ag%", font)[1]
    pad, k = 12, m.shape[0]
    cell = max(90, name_w + 12)  # wide enough for the column labels
    title_w = text_size(probe, title, font)[0] + 2 * pad if title else 0
    x0, y0 = pad + line_h + pad + name_w + pad, pad + (line_h + pad if title else 0)
    width = max(x0 + k * cell + pad, title_w)  # a long title widens the canvas
    height = y0 + k * cell + 2 * (line_h + pad) + pad
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        # Centred over the grid, but shifted if it would run off the canvas.
        cx = min(max(x0 + k * cell / 2, title_w / 2), width - title_w / 2)
        draw.text((cx, pad), title, font=font, fill=BLACK, anchor="mt")
    _draw_cells(draw, m, (x0, y0), cell, (font, small))
    for i, name in enumerate(class_names):
        draw.text((x0 - pad, y0 + (i + 0.5) * cell), name, font=font, fill=BLACK, anchor="rm")
        draw.text((x0 + (i + 0.5) * cell, y0 + k * cell + pad), name, font=font, fill=BLACK, anchor="mt")
    axis_y = y0 + k * cell + line_h + 2 * pad
    draw.text((x0 + k * cell / 2, axis_y), "predicted", font=font, fill=BLACK, anchor="mt")
    _draw_vertical_text(image, "true", font, (pad + line_h // 2, y0 + k * cell // 2))
    return image


def confusion_matrix_image(cm: ArrayLike, class_names: Sequence[str], title: str = "") -> Any:
    """A confusion matrix drawn as an RGB Pillow image.

    Cells are shaded by their row-normalised value (the fraction of that true
    class) and show the count and that percentage.

    Args:
        cm: ``(k, k)`` confusion matrix, rows = true class.
        class_names: ``k`` class names, used on both axes.
        title: Optional title drawn above the matrix.

    Raises:
        ValueError: If ``cm`` is not a square count matrix or the number of
            names differs from its size.
    """
    m = as_confusion_matrix(cm)
    if len(class_names) != m.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {m.shape[0]}x{m.shape[0]} confusion matrix")
    return _render_confusion_matrix(m, [str(n) for n in class_names], title)


def save_confusion_matrix_png(
    cm: ArrayLike, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Write :func:`confusion_matrix_image` to ``path`` as a PNG; missing parent folders are created.

    Raises:
        ValueError: As :func:`confusion_matrix_image`; nothing is written then.
        data.files.WriteError: The disk is full or the folder cannot be written (one line).
    """
    save_png(confusion_matrix_image(cm, class_names, title), path)


# --------------------------------------------------------------------------- #
# Heatmap (the study's cross-site matrix)
# --------------------------------------------------------------------------- #
def heatmap_image(values: ArrayLike, rows: Sequence[str], columns: Sequence[str], title: str = "") -> Any:
    """A matrix of values in [0, 1] (accuracies) as an image: cells shaded by value and labelled with it to
    3 decimals; NaN cells are grey and say ``n/a``. Rows are named on the left, columns above."""
    from PIL import Image, ImageDraw

    m = np.asarray(values, dtype=float)
    if m.shape != (len(rows), len(columns)):
        raise ValueError(f"a {m.shape} matrix for {len(rows)} row and {len(columns)} column names")
    font, small = load_font(14), load_font(12)
    measure = _measuring_draw()
    left = 16 + max(text_size(measure, r, font)[0] for r in rows)
    cell = max(72, 12 + max(text_size(measure, c, small)[0] for c in columns))
    top = 16 + (24 if title else 0) + text_size(measure, "Hg", small)[1] + 8
    image = Image.new("RGB", (left + cell * len(columns) + 16, top + cell * len(rows) + 16), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((image.width / 2, 12), title, font=font, fill=BLACK, anchor="mt")
    for j, name in enumerate(columns):
        draw.text((left + (j + 0.5) * cell, top - 6), name, font=small, fill=BLACK, anchor="mb")
    for i, name in enumerate(rows):
        draw.text((left - 8, top + (i + 0.5) * cell), name, font=font, fill=BLACK, anchor="rm")
        for j in range(len(columns)):
            value = m[i, j]
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            known = math.isfinite(value)
            shade = min(max(value, 0.0), 1.0) if known else 0.0
            draw.rectangle(box, fill=_shade(shade) if known else (200, 200, 200), outline=GREY)
            text = f"{value:.3f}" if known else "n/a"
            _draw_centered(draw, box, [(text, font)], WHITE if shade > 0.5 else BLACK)
    return image


def save_heatmap_png(
    path: str | os.PathLike, values: ArrayLike, rows: Sequence[str], columns: Sequence[str], title: str = ""
) -> None:
    """Write :func:`heatmap_image` to ``path`` as a PNG (atomically)."""
    save_png(heatmap_image(values, rows, columns, title), path)


# --------------------------------------------------------------------------- #
# Study chart
# --------------------------------------------------------------------------- #
#: Bar colour of the first, second, ... metric of the study chart.
METRIC_COLORS = ((31, 119, 180), (148, 103, 189), (255, 127, 14), (44, 160, 44), (214, 39, 40))
PANEL_HEIGHT = 300
LEGEND_HEIGHT = 36
SLOT = 100  # pixels per variant: one bar per metric and a gap


def _axis_low(table: StudyTable) -> float:
    """Bottom of the y axis: 0, or lower in steps of 0.25 when a mean is negative (QWK can be).

    Intervals do not move the axis: with two seeds they are wide, and they are clipped instead.
    """
    means = [mean for group in table.values() for stats in group.values() for n, mean, _ in stats.values() if n]
    return max(-1.0, math.floor(min([0.0, *means]) * 4) / 4)


def study_chart(table: StudyTable, metrics: Sequence[tuple[str, str]]) -> Any:
    """A panel per group, one bar per metric and variant with its 95% interval as an error bar.

    Args:
        table: ``{group: {variant: {metric key: (n, mean, CI half-width)}}}``, in display order.
        metrics: ``(key, label)`` of each metric, at most :data:`METRIC_COLORS` of them.
    """
    from PIL import Image, ImageDraw

    font = load_font(12)
    width = 80 + SLOT * max([1, *(len(group) for group in table.values())])
    cols = min(2, max(1, len(table)))
    rows = max(1, math.ceil(len(table) / cols))
    legend = _legend(_measuring_draw(), font, metrics)  # measure only
    image = Image.new("RGB", (max(width * cols, legend + 10), LEGEND_HEIGHT + PANEL_HEIGHT * rows), WHITE)
    draw = ImageDraw.Draw(image)
    _legend(draw, font, metrics)
    low = _axis_low(table)
    keys = [key for key, _ in metrics]
    for i, (group, stats) in enumerate(table.items()):
        origin = (width * (i % cols), LEGEND_HEIGHT + PANEL_HEIGHT * (i // cols))
        _panel(draw, font, origin, width, group, stats, keys, low)
    return image


def save_study_chart(path: str | os.PathLike, table: StudyTable, metrics: Sequence[tuple[str, str]]) -> None:
    """Write :func:`study_chart` to ``path`` as a PNG."""
    save_png(study_chart(table, metrics), path)


def _legend(draw: Any, font: Any, metrics: Sequence[tuple[str, str]]) -> int:
    """Colour key of the metrics; returns its width in pixels."""
    x = 10
    for (_, label), color in zip(metrics, METRIC_COLORS):
        draw.rectangle((x, 12, x + 12, 24), fill=color)
        draw.text((x + 16, 11), label, fill=BLACK, font=font)
        x += 32 + int(draw.textlength(label, font=font))
    note = "error bars: 95% t interval over seeds"
    draw.text((x, 11), note, fill=GREY, font=font)
    return x + int(draw.textlength(note, font=font))


def _panel(
    draw: Any,
    font: Any,
    origin: tuple[int, int],
    width: int,
    group: str,
    stats: dict[str, dict[str, tuple[int, float, float]]],
    keys: Sequence[str],
    low: float,
) -> None:
    """One group: grid, axis, and per variant its bars, name and number of seeds."""
    left, top = origin[0] + 50, origin[1] + 26
    right, bottom = origin[0] + width - 20, origin[1] + PANEL_HEIGHT - 44

    def y(value: float) -> float:
        return bottom - (min(max(value, low), 1.0) - low) / (1.0 - low) * (bottom - top)

    draw.text((left, origin[1] + 6), group, fill=BLACK, font=font)
    for step in range(round((1.0 - low) * 4) + 1):
        tick = low + step * 0.25
        draw.line((left, y(tick), right, y(tick)), fill=(225, 225, 225))
        draw.text((origin[0] + 10, y(tick) - 7), f"{tick:.2f}", fill=GREY, font=font)
    draw.line((left, top, left, bottom), fill=BLACK)
    for j, (variant, metrics) in enumerate(stats.items()):
        x = left + 10 + j * SLOT
        _bars(draw, x, [metrics[key] for key in keys], y, low)
        n = max(stat[0] for stat in metrics.values())
        for k, text in enumerate((variant, f"n={n}")):
            draw.text(
                (x + (SLOT - 20 - draw.textlength(text, font=font)) / 2, bottom + 6 + 15 * k),
                text,
                fill=BLACK if k == 0 else GREY,
                font=font,
            )


def _bars(
    draw: Any, x: float, stats: Sequence[tuple[int, float, float]], y: Callable[[float], float], low: float
) -> None:
    """One bar per metric from zero to its mean, with the interval as an error bar."""
    bar = (SLOT - 20) / len(stats)
    for k, ((n, mean, half), color) in enumerate(zip(stats, METRIC_COLORS)):
        if n == 0:
            continue
        x0 = x + k * bar
        top, base = sorted((y(mean), y(0.0)))
        draw.rectangle((x0 + 1, top, x0 + bar - 2, base), fill=color)
        if math.isfinite(half):
            mid = x0 + bar / 2
            ends = (mean + half, mean - half)
            draw.line((mid, y(ends[0]), mid, y(ends[1])), fill=BLACK, width=1)
            # A clipped end gets no cap, so that it does not read as the interval's bound.
            for end in ends:
                if low <= end <= 1.0:
                    draw.line((mid - 4, y(end), mid + 4, y(end)), fill=BLACK, width=1)


# --------------------------------------------------------------------------- #
# Grad-CAM panels
# --------------------------------------------------------------------------- #
_PANEL_GAP = 4


def _label_tile(tile: Any, text: str, font: Any) -> None:
    """Write the stream's name in the tile's top-left corner on a dark box."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(tile)
    _, _, right, bottom = draw.textbbox((2, 2), text, font=font)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=BLACK)
    draw.text((2, 2), text, fill=WHITE, font=font)


def compose_panel(tiles: Sequence[tuple[str, np.ndarray]], caption: str) -> np.ndarray:
    """Named uint8 HxWx3 tiles side by side at a common height above a caption strip; uint8 HxWx3."""
    from PIL import Image, ImageDraw

    font = load_font(10)
    height = max(t.shape[0] for _, t in tiles)
    images = []
    for name, tile in tiles:
        image = Image.fromarray(tile)
        if tile.shape[0] != height:
            image = image.resize((round(tile.shape[1] * height / tile.shape[0]), height), Image.BILINEAR)
        _label_tile(image, name, font)
        images.append(image)
    _, _, text_right, text_bottom = _measuring_draw().textbbox((0, 0), caption, font=font)
    strip = text_bottom + 8
    width = max(sum(i.width for i in images) + _PANEL_GAP * (len(images) - 1), text_right + 8)
    canvas = Image.new("RGB", (width, height + strip), WHITE)
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + _PANEL_GAP
    ImageDraw.Draw(canvas).text((4, height + 4), caption, fill=BLACK, font=font)
    return np.asarray(canvas)
