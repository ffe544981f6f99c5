"""Pictures of edits for people: a strip (rows = samples, columns = frames) and an animated GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from latentedit.wire import image_grid


def _label(image: np.ndarray, lines: list[str], scale: int) -> Image.Image:
    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    if lines:
        # Text goes in a band under the image, never over the face.
        band = 11 * len(lines) + 3
        canvas = Image.new("RGB", (picture.width, picture.height + band), (0, 0, 0))
        canvas.paste(picture, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(lines):
            draw.text((2, picture.height + 1 + 11 * i), line, fill=(255, 255, 255))
        return canvas
    return picture


def write_edit(frames: list[np.ndarray], labels: list[list[list[str]]], out: Path, scale: int = 2) -> tuple[Path, Path]:
    """frames[f]: uint8 [N, H, W, 3]; labels[f][n]: text lines for sample n in frame f.

    Writes `out`.png (one row per sample, one column per frame) and `out`.gif (each GIF frame
    shows every sample at that step), and returns both paths.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tiles = [[np.asarray(_label(frames[f][n], labels[f][n], scale)) for f in range(len(frames))] for n in range(len(frames[0]))]
    strip = image_grid(np.stack([tile for row in tiles for tile in row]), columns=len(frames))
    png, gif = out.with_suffix(".png"), out.with_suffix(".gif")
    Image.fromarray(strip).save(png)
    columns = int(np.ceil(np.sqrt(len(tiles))))
    pictures = [Image.fromarray(image_grid(np.stack([row[f] for row in tiles]), columns)) for f in range(len(frames))]
    # Play forward then back, so the loop has no jump.
    sequence = pictures + pictures[-2:0:-1]
    sequence[0].save(gif, save_all=True, append_images=sequence[1:], duration=180, loop=0)
    return png, gif
