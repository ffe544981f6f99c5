"""Head pose and mouth geometry from 68-point (iBUG / dlib) landmarks.

Pose: a scaled-orthographic fit of a generic 6-point 3D face (nose tip, chin, outer eye
corners, mouth corners; the model commonly used with solvePnP) to the landmarks, solved in
closed form per face, then Euler angles in degrees. Sign conventions (image coordinates):
yaw > 0 when the face turns toward the image's right side (checked on edited faces); pitch and
roll follow the same right-handed fit (pitch > 0 tilting up, roll > 0 clockwise; not checked by eye).
Mirroring an image negates yaw and roll.

Mouth geometry is relative to the inter-ocular distance, so it does not depend on scale.
"""

from __future__ import annotations

import numpy as np

# Landmark indices of the 3D model points, and the model (x right, y up, z toward the camera).
POSE_LANDMARKS = np.array([30, 8, 36, 45, 48, 54])
MODEL_POINTS = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.0, -330.0, -65.0],
        [-225.0, 170.0, -135.0],
        [225.0, 170.0, -135.0],
        [-150.0, -150.0, -125.0],
        [150.0, -150.0, -125.0],
    ]
)
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)


def rotation_from_landmarks(points: np.ndarray) -> np.ndarray:
    """[68, 2] image points -> 3x3 rotation of the model into the camera frame."""
    image = points[POSE_LANDMARKS].astype(np.float64) * np.array([1.0, -1.0])  # y up
    image = image - image.mean(axis=0)
    model = MODEL_POINTS - MODEL_POINTS.mean(axis=0)
    # Least-squares 2x3 projection M with image ~ model @ M.T, then its closest scaled rotation.
    projection, *_ = np.linalg.lstsq(model, image, rcond=None)
    u, _, vt = np.linalg.svd(projection.T, full_matrices=False)
    rows = u @ vt  # 2x3 with orthonormal rows
    return np.vstack([rows, np.cross(rows[0], rows[1])])


def euler_degrees(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a model-to-camera rotation."""
    yaw = np.degrees(np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2]))
    roll = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    return float(yaw), float(pitch), float(-roll)


def pose_and_mouth(points: np.ndarray) -> dict[str, np.ndarray]:
    """[N, 68, 2] landmarks -> yaw, pitch, roll (degrees), mouth_width, mouth_openness."""
    n = len(points)
    out = {name: np.zeros(n, np.float32) for name in ("yaw", "pitch", "roll", "mouth_width", "mouth_openness")}
    for i, face in enumerate(points):
        out["yaw"][i], out["pitch"][i], out["roll"][i] = euler_degrees(rotation_from_landmarks(face))
        eye_distance = max(float(np.linalg.norm(face[LEFT_EYE].mean(0) - face[RIGHT_EYE].mean(0))), 1e-6)
        out["mouth_width"][i] = np.linalg.norm(face[54] - face[48]) / eye_distance
        inner_gap = np.mean([np.linalg.norm(face[a] - face[b]) for a, b in ((61, 67), (62, 66), (63, 65))])
        out["mouth_openness"][i] = inner_gap / eye_distance
    return out
