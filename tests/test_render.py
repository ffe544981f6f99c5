"""Score lines people read: in the terminal and under each frame of an edit's strip PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latentedit.render import frame_lines, label, number, sample_lines, wrap, write_edit

EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def _scores():
    probabilities = np.array([[0.05, 0.0, 0.05, 0.7, 0.1, 0.0, 0.1],
                              [0.1, 0.0, 0.0, 0.1, 0.0, 0.2, 0.6]], np.float32)
    target = np.array([1.0, 0.0, 0.0], np.float32)
    # Unit embeddings at known angles to the target: cosines 0.6 and -0.8.
    embedding = np.array([[0.6, 0.8, 0.0], [-0.8, 0.0, 0.6]], np.float32)
    scores = {
        "pose": {"yaw": np.array([12.34, -3.0], np.float32), "mouth_openness": np.array([0.123, 0.0], np.float32)},
        "expression": {"probabilities": probabilities},
        "caption": {"embedding": embedding,
                    "captions": np.array(["a smiling young woman facing right, mouth open",
                                          "a calm older man facing the camera, mouth closed"], dtype=object)},
        "keypoints5": {"points": np.zeros((2, 5, 2), np.float32)},
    }
    return scores, {"expression.probabilities": EMOTIONS}, target


def test_vector_scores_read_as_top_label_caption_and_cosine():
    scores, labels, target = _scores()
    first = sample_lines(scores, 0, labels, target)
    second = sample_lines(scores, 1, labels, target)
    assert "expression happy 0.70" in first and "expression neutral 0.60" in second
    assert '"a smiling young woman facing right, mouth open"' in first
    assert "cos to target 0.60" in first and "cos to target -0.80" in second
    assert "yaw 12.3" in first and "yaw -3.00" in second and "mouth_openness 0.12" in first
    # Points and raw embeddings are not one number: not shown.
    assert not any("points" in line or "embedding" in line for line in first + second)
    # Without a target there is no cosine; without labels no class name is invented.
    bare = sample_lines(scores, 0)
    assert not any("cos" in line for line in bare) and not any(line.startswith("expression") for line in bare)


def test_frame_lines_name_each_condition_boundary():
    lines = frame_lines({"distance": 1.5, "mean_boundary_distance": 1.2, "condition_distance/yaw": -0.0312,
                         "condition_distance/smile": 0.4})
    assert lines == ["d=+1.5", "smile boundary +0.40", "yaw boundary -0.03"]
    assert frame_lines({"distance_to_target": 0.75, "reached": 0.5}) == ["to target 0.75, 50% reached"]


def test_numbers_are_short():
    assert [number(v) for v in (12.34, -3.0, 0.8234, 0.0, 1.2e-5, 250000.0)] == ["12.3", "-3.00", "0.82", "0.00", "1.2e-05", "2.5e+05"]


def test_label_wraps_text_under_the_face_never_over_it():
    face = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    sentence = '"a smiling young woman facing right, mouth open"'
    tile = np.asarray(label(face, ["d=+1.5", sentence], scale=4))
    # The face, enlarged, is untouched; the text sits in a band below it.
    assert np.array_equal(tile[:64], np.asarray(Image.fromarray(face).resize((64, 64), Image.Resampling.NEAREST)))
    pieces = wrap(sentence, 60)
    assert len(pieces) >= 3 and " ".join(pieces) == sentence
    assert tile.shape[0] > 64 + 11 * (1 + len(pieces)) - 1
    band = tile[64:]
    rows_with_text = np.flatnonzero(band.max(axis=(1, 2)) > 0)
    assert rows_with_text.size and rows_with_text.max() >= 11 * len(pieces)  # the last wrapped line is drawn
    # A word wider than the tile is cut, never drawn past the edge.
    assert all(len(piece) < 40 for piece in wrap("x" * 80, 60))


def test_strip_tiles_line_up_whatever_their_text(tmp_path):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    labels = [[["d=-1.0"], ["d=-1.0", "a long caption that wraps over several lines here"]],
              [["d=+0.0"], ["d=+0.0"]],
              [["d=+1.0", "yaw 3.00"], ["d=+1.0"]]]
    png, gif = write_edit(frames, labels, tmp_path / "strip", scale=2)
    strip = np.asarray(Image.open(png))
    pad = 2  # wire.image_grid's white gap
    tile_height = (strip.shape[0] - pad) // 2 - pad
    assert strip.shape[1] == 3 * (32 + pad) + pad and strip.shape[0] == 2 * (tile_height + pad) + pad
    assert tile_height > 32 + 11 * 4  # every tile's band fits the longest (wrapped) text
    # Each row starts with its sample's face (no text drawn over it).
    for n in range(2):
        top = pad + (tile_height + pad) * n
        enlarged = np.asarray(Image.fromarray(frames[0][n]).resize((32, 32), Image.Resampling.NEAREST))
        assert np.array_equal(strip[top:top + 32, pad:pad + 32], enlarged)
    assert Image.open(gif).n_frames == 4  # forward, then back without repeating the ends
