"""``examples.png``: one example tile per grade (rows) and hospital (columns).

Each cell shows the whole tile, the context field (outer box) and the detail
field (inner box) around the tile's centre, with the tile's true and shown
levels underneath, so the page says what every stream sees.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data.benchmark.design import HELDOUT, Tile
from data.files import write_with
from data.records import GRADE_NAMES

CELL, MARGIN, LABEL = 200, 8, 30


def pick_examples(tiles: list[Tile]) -> dict[tuple[str, int], Tile]:
    """The first tile of each (hospital, grade), preferring test tiles (every hospital has them)."""
    chosen: dict[tuple[str, int], Tile] = {}
    for tile in sorted(tiles, key=lambda t: (t.split != "test", t.index)):
        chosen.setdefault((tile.hospital, tile.grade), tile)
    return chosen


def _hospitals(tiles: list[Tile]) -> list[str]:
    names = sorted({t.hospital for t in tiles if t.hospital != HELDOUT}, key=lambda n: int(n[1:]))
    return names + ([HELDOUT] if any(t.hospital == HELDOUT for t in tiles) else [])


def _cell(path: Path, fov: int) -> Image.Image:
    """The tile at cell size with the context and detail fields drawn around its centre."""
    with Image.open(path) as img:
        tile = img.convert("RGB")
    side = tile.size[0]
    cell = tile.resize((CELL, CELL), Image.BILINEAR)
    draw = ImageDraw.Draw(cell)
    scale = CELL / side
    for field, colour in ((fov, (20, 20, 20)), (fov // 4, (255, 255, 255))):
        half = field * scale / 2
        draw.rectangle([CELL / 2 - half, CELL / 2 - half, CELL / 2 + half, CELL / 2 + half], outline=colour)
    return cell


def examples_page(root: Path, tiles: list[Tile], fov: int) -> Image.Image:
    """The page as an image (tiles are read back from ``root``)."""
    from data.benchmark.dataset import relpath

    hospitals = _hospitals(tiles)
    chosen = pick_examples(tiles)
    width = MARGIN + len(hospitals) * (CELL + MARGIN) + 70
    height = LABEL + len(GRADE_NAMES) * (CELL + LABEL + MARGIN)
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default()
    for col, name in enumerate(hospitals):
        draw.text((70 + col * (CELL + MARGIN) + CELL // 2 - 20, 8), name, fill=(0, 0, 0), font=font)
    for row, grade in enumerate(GRADE_NAMES):
        top = LABEL + row * (CELL + LABEL + MARGIN)
        draw.text((6, top + CELL // 2), grade, fill=(0, 0, 0), font=font)
        for col, name in enumerate(hospitals):
            tile = chosen.get((name, row))
            if tile is None:
                continue
            left = 70 + col * (CELL + MARGIN)
            page.paste(_cell(root / relpath(tile), fov), (left, top))
            note = f"A={tile.arch} N={tile.nuclear} (shown {tile.arch_shown},{tile.nuclear_shown})"
            draw.text((left, top + CELL + 4), note, fill=(0, 0, 0), font=font)
    return page


def write_examples(root: Path, tiles: list[Tile]) -> None:
    """Write ``root/examples.png`` atomically."""
    from data.benchmark.dataset import EXAMPLES_NAME

    fov = _context_fov(root)
    page = examples_page(root, tiles, fov)
    write_with(root / EXAMPLES_NAME, lambda handle: page.save(handle, format="PNG"))


def _context_fov(root: Path) -> int:
    """The context field recorded in ``benchmark.json`` (written before the examples)."""
    import json

    from data.benchmark.dataset import SPEC_NAME

    return int(json.loads((root / SPEC_NAME).read_text(encoding="utf-8"))["data_settings"]["context_fov"])
