"""MTCNN face detection (P-, R-, O-Net cascade) without torchvision.

The networks and the cascade follow `facenet_pytorch` (whose weights we load: plain state
dicts); its package imports torchvision, which does not import beside the CPU torch build
here, so the few torchvision pieces (NMS, area resampling) are written with plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_min: bool = False) -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression (IoU, or intersection over the smaller box)."""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        xx1 = torch.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = torch.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = torch.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = torch.minimum(boxes[i, 3], boxes[rest, 3])
        inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
        denom = torch.minimum(area[i], area[rest]) if by_min else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def batched_nms(boxes, scores, groups, threshold, by_min=False) -> torch.Tensor:
    """NMS within each group (image): offset boxes so groups never overlap."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    offsets = groups.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, threshold, by_min)


def _resample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="area")


def _square(boxes: torch.Tensor) -> torch.Tensor:
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side.repeat(2, 1).permute(1, 0)
    return boxes


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] = torch.stack(
        [boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h, boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h]
    ).permute(1, 0)
    return boxes


def _crops(images: torch.Tensor, boxes: torch.Tensor, owners: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop each box (clipped to the image, 1-based as in the reference) and resize it."""
    h, w = images.shape[2:4]
    clipped = boxes.trunc().int().numpy()
    x, y = np.maximum(clipped[:, 0], 1), np.maximum(clipped[:, 1], 1)
    ex, ey = np.minimum(clipped[:, 2], w), np.minimum(clipped[:, 3], h)
    valid = (ey > y - 1) & (ex > x - 1)
    crops = [
        _resample(images[owners[k], :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]].unsqueeze(0), (size, size))
        for k in range(len(boxes))
        if valid[k]
    ]
    keep = torch.from_numpy(valid)
    if not crops:
        return torch.zeros(0, 3, size, size), keep
    return (torch.cat(crops) - 127.5) * 0.0078125, keep


@dataclass
class Detections:
    """Per image: the best face's probability (0 if none), box [4] and 5 landmarks [5, 2]."""

    probability: np.ndarray  # [N]
    boxes: np.ndarray  # [N, 4], x1 y1 x2 y2; zeros where no face was found
    landmarks: np.ndarray  # [N, 5, 2], x y; NaN where no face was found


class MTCNN:
    def __init__(self, pnet: PNet, rnet: RNet, onet: ONet, min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709) -> None:
        self.pnet, self.rnet, self.onet = pnet.eval(), rnet.eval(), onet.eval()
        self.min_face_size, self.thresholds, self.factor = min_face_size, thresholds, factor

    @classmethod
    def from_files(cls, folder: Path, **kwargs) -> MTCNN:
        from safetensors.torch import load_file

        pnet, rnet, onet = PNet(), RNet(), ONet()
        for net, name in ((pnet, "pnet"), (rnet, "rnet"), (onet, "onet")):
            net.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        return cls(pnet, rnet, onet, **kwargs)

    @torch.inference_mode()
    def landmarks_in_box(self, images: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """O-Net's 5 landmarks for a fixed box in every image (for images where detection failed)."""
        if len(images) == 0:
            return np.zeros((0, 5, 2), np.float32)
        x1, y1, x2, y2 = box
        crops = torch.from_numpy(images[:, y1:y2, x1:x2]).permute(0, 3, 1, 2).float()
        _, points, _ = self.onet((_resample(crops, (48, 48)) - 127.5) * 0.0078125)
        px = (x2 - x1) * points[:, :5] + x1
        py = (y2 - y1) * points[:, 5:] + y1
        return torch.stack([px, py], dim=2).numpy()

    @torch.inference_mode()
    def detect(self, images: np.ndarray) -> Detections:
        """uint8 RGB [N, H, W, 3] -> the most probable face of each image."""
        imgs = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        n, h, w = imgs.shape[0], imgs.shape[2], imgs.shape[3]
        scale = 12.0 / self.min_face_size
        min_side = min(h, w) * scale
        scales = []
        while min_side >= 12:
            scales.append(scale)
            scale *= self.factor
            min_side *= self.factor

        # Stage 1: proposals from the image pyramid.
        boxes_all, owners_all = [], []
        for s in scales:
            data = (_resample(imgs, (int(h * s + 1), int(w * s + 1))) - 127.5) * 0.0078125
            reg, probs = self.pnet(data)
            mask = probs[:, 1] >= self.thresholds[0]
            idx = mask.nonzero()
            if idx.numel() == 0:
                continue
            cells = idx[:, 1:].float().flip(1)
            q1, q2 = ((2 * cells + 1) / s).floor(), ((2 * cells + 12) / s).floor()
            regs = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
            boxes = torch.cat([q1, q2, probs[:, 1][mask].unsqueeze(1), regs], dim=1)
            pick = batched_nms(boxes[:, :4], boxes[:, 4], idx[:, 0], 0.5)
            boxes_all.append(boxes[pick])
            owners_all.append(idx[:, 0][pick])
        empty = Detections(np.zeros(n, np.float32), np.zeros((n, 4), np.float32), np.full((n, 5, 2), np.nan, np.float32))
        if not boxes_all:
            return empty
        boxes, owners = torch.cat(boxes_all), torch.cat(owners_all)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], owners, 0.7)
        boxes, owners = boxes[pick], owners[pick]
        rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * rw, boxes[:, 1] + boxes[:, 6] * rh,
                             boxes[:, 2] + boxes[:, 7] * rw, boxes[:, 3] + boxes[:, 8] * rh, boxes[:, 4]]).permute(1, 0)
        boxes = _square(boxes)

        # Stage 2: refine.
        data, valid = _crops(imgs, boxes, owners, 24)
        boxes, owners = boxes[valid], owners[valid]
        if len(data) == 0:
            return empty
        reg, probs = self.rnet(data)
        keep = probs[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        owners, reg = owners[keep], reg[keep]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], owners, 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        owners = owners[pick]

        # Stage 3: output boxes, probabilities and landmarks.
        data, valid = _crops(imgs, boxes, owners, 48)
        boxes, owners = boxes[valid], owners[valid]
        if len(data) == 0:
            return empty
        reg, points, probs = self.onet(data)
        keep = probs[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
        owners, reg, points = owners[keep], reg[keep], points[keep]
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * points[:, 5:] + boxes[:, 1:2] - 1
        landmarks = torch.stack([px, py], dim=2)
        boxes = _regress(boxes, reg)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], owners, 0.7, by_min=True)
        boxes, owners, landmarks = boxes[pick], owners[pick], landmarks[pick]

        result = empty
        for k in range(len(boxes)):
            i = int(owners[k])
            if boxes[k, 4] > result.probability[i]:
                result.probability[i] = float(boxes[k, 4])
                result.boxes[i] = boxes[k, :4].numpy()
                result.landmarks[i] = landmarks[k].numpy()
        return result
