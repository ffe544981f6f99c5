"""Pictures and text of edits for people: a strip (rows = samples, columns = frames), an animated
GIF, and the readable score lines printed in the terminal and under each frame."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from latentedit.wire import image_grid

LINE_PX = 11  # height of one text line under a frame
CONDITION_PREFIX = "condition_distance/"


def number(value: float) -> str:
    """A score in few characters: 12.3, -4.0, 0.82, 1.2e-05."""
    value = float(value)
    if value != 0 and (abs(value) < 0.01 or abs(value) >= 1e5):
        return f"{value:.2g}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


def frame_lines(metrics: Mapping[str, float]) -> list[str]:
    """What one frame's method metrics say (the same for every sample of the frame).

    The edit distance (InterFaceGAN, GANSpace) or the distance to the target (SGF), then the
    distance to each condition boundary held fixed: the batch mean, as the editor reports it."""
    lines = []
    if "distance" in metrics:
        lines.append(f"d={metrics['distance']:+.1f}")
    if "distance_to_target" in metrics:
        reached = f", {metrics['reached']:.0%} reached" if "reached" in metrics else ""
        lines.append(f"to target {number(metrics['distance_to_target'])}{reached}")
    for key in sorted(k for k in metrics if k.startswith(CONDITION_PREFIX)):
        lines.append(f"{key.removeprefix(CONDITION_PREFIX)} boundary {metrics[key]:+.2f}")
    return lines


def sample_lines(scores: Mapping[str, Mapping[str, np.ndarray]], n: int, labels: Mapping[str, list[str]] | None = None,
                 target_embedding: np.ndarray | None = None) -> list[str]:
    """Sample n's scores as short lines: one per scalar output ("yaw 12.3"); a labelled vector
    (class probabilities) as its top label with its probability ("expression happy 0.82"); a
    caption head's sentence, then its cosine to `target_embedding` when there is a target.

    `scores`: {head: {output: array}} as `wire.scores_from_proto` gives (captions under
    "captions"); `labels`: {"head.output": entry names} from the scorer's ListHeads. Outputs
    that do not read as one number (points, unlabelled vectors) are left out."""
    labels = labels or {}
    lines = []
    for head, outputs in scores.items():
        if "captions" in outputs:
            lines.append(f'"{outputs["captions"][n]}"')
            if target_embedding is not None and "embedding" in outputs:
                lines.append(f"cos to target {cosine(outputs['embedding'][n], target_embedding):.2f}")
        for output, values in outputs.items():
            if output in ("captions", "embedding"):
                continue
            value = np.asarray(values[n])
            if value.ndim == 0:
                lines.append(f"{output} {number(float(value))}")
            elif value.ndim == 1 and len(labels.get(f"{head}.{output}", ())) == len(value):
                top = int(np.argmax(value))
                lines.append(f"{head} {labels[f'{head}.{output}'][top]} {number(value[top])}")
    return lines


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


def wrap(line: str, width_px: int, font=None) -> list[str]:
    """`line` broken at spaces into pieces no wider than `width_px` (a longer word is cut)."""
    font = font or _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pieces: list[str] = []
    current = ""
    for word in line.split(" "):
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=font) <= width_px:
            current = candidate
            continue
        if current:
            pieces.append(current)
        while len(word) > 1 and draw.textlength(word, font=font) > width_px:
            cut = 1
            while cut < len(word) and draw.textlength(word[:cut + 1], font=font) <= width_px:
                cut += 1
            pieces.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        pieces.append(current)
    return pieces


def label(image: np.ndarray, lines: list[str], scale: int = 1, band_lines: int | None = None) -> Image.Image:
    """`image` enlarged `scale` times, with `lines` (wrapped to its width) in a band under it,
    never over the face. `band_lines` fixes the band height (so tiles of a strip line up)."""
    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    font = _font()
    wrapped = [piece for line in lines for piece in wrap(line, picture.width - 4, font)]
    rows = len(wrapped) if band_lines is None else band_lines
    if rows == 0:
        return picture
    canvas = Image.new("RGB", (picture.width, picture.height + LINE_PX * rows + 3), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped[:rows]):
        draw.text((2, picture.height + 1 + LINE_PX * i), line, fill=(255, 255, 255), font=font)
    return canvas


def wrapped_count(lines: list[str], width_px: int) -> int:
    font = _font()
    return sum(len(wrap(line, width_px - 4, font)) for line in lines)


def write_edit(frames: list[np.ndarray], labels: list[list[list[str]]], out: Path, scale: int = 2) -> tuple[Path, Path]:
    """frames[f]: uint8 [N, H, W, 3]; labels[f][n]: text lines for sample n in frame f.

    Writes `out`.png (one row per sample, one column per frame; every tile's text band as tall
    as the longest) and `out`.gif (each GIF frame shows every sample at that step), and returns
    both paths.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    width = frames[0].shape[2] * scale
    band = max(wrapped_count(lines, width) for frame in labels for lines in frame)
    tiles = [[np.asarray(label(frames[f][n], labels[f][n], scale, band)) for f in range(len(frames))]
             for n in range(len(frames[0]))]
    strip = image_grid(np.stack([tile for row in tiles for tile in row]), columns=len(frames))
    png, gif = out.with_suffix(".png"), out.with_suffix(".gif")
    Image.fromarray(strip).save(png)
    columns = int(np.ceil(np.sqrt(len(tiles))))
    pictures = [Image.fromarray(image_grid(np.stack([row[f] for row in tiles]), columns)) for f in range(len(frames))]
    # Play forward then back, so the loop has no jump.
    sequence = pictures + pictures[-2:0:-1]
    sequence[0].save(gif, save_all=True, append_images=sequence[1:], duration=180, loop=0)
    return png, gif
