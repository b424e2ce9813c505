"""What a depth prediction becomes: a colour image with a colour bar in metres, a 16-bit PNG in
millimetres, a float32 .npy in metres.

One colour scale, fixed by the caller (the model's depth range unless `--depth-range` is given):
the same metre gets the same colour in every image and every frame of a video (a scale stretched
per frame would flicker).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dinokit.writing import atomic_write

BAR_WIDTH = 24
LABELS_WIDTH = 70
PANEL_WIDTH = BAR_WIDTH + LABELS_WIDTH  # what `with_colour_bar` adds to an image's width
BAR_TICKS = 5
MM_MAX = 65535  # the largest 16-bit value: 65.535 m


UNMEASURED = (128, 128, 128)


def colorize(depth: np.ndarray, depth_range: tuple[float, float]) -> np.ndarray:
    """RGB uint8 of a depth map in metres: near bright, far dark (inferno), clipped to `depth_range`;
    unmeasured pixels (0 or NaN, in a ground-truth map) grey."""
    near, far = depth_range
    scaled = np.clip(np.nan_to_num((depth - near) / max(far - near, 1e-9)), 0.0, 1.0)
    indices = np.round(255 * (1.0 - scaled)).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(indices, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    rgb[~(depth > 0)] = UNMEASURED
    return rgb


def with_colour_bar(rgb: np.ndarray, depth_range: tuple[float, float]) -> np.ndarray:
    """`rgb` with a vertical colour bar on its right, labelled in metres at `BAR_TICKS` heights."""
    height = rgb.shape[0]
    near, far = depth_range
    column = np.linspace(near, far, height, dtype=np.float32)[:, None].repeat(BAR_WIDTH, axis=1)
    panel = np.full((height, PANEL_WIDTH, 3), 255, dtype=np.uint8)
    panel[:, :BAR_WIDTH] = colorize(column, depth_range)
    scale = max(0.35, min(0.5, height / 600))
    for tick in range(BAR_TICKS):
        row = round(tick * (height - 1) / (BAR_TICKS - 1))
        value = near + (far - near) * row / max(height - 1, 1)
        y = min(max(row + 5, 12), height - 3)
        cv2.putText(panel, f"{value:.2f} m", (BAR_WIDTH + 4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)
    return np.concatenate([rgb, panel], axis=1)


def depth_png(depth: np.ndarray) -> Image.Image:
    """A 16-bit PNG of the depth in millimetres (rounded; beyond 65.535 m clipped: use the .npy)."""
    millimetres = np.clip(np.round(depth * 1000.0), 0, MM_MAX).astype(np.uint16)
    return Image.fromarray(millimetres)


def write_depth_outputs(
    out_dir: Path, stem: str, depth: np.ndarray, depth_range: tuple[float, float], *, npy: bool = False
) -> list[Path]:
    """`<stem>_depth.png` (colours + bar), `<stem>_depth16.png` (mm) and with `npy` `<stem>.npy` (m)."""
    written = [out_dir / f"{stem}_depth.png", out_dir / f"{stem}_depth16.png"]
    coloured = with_colour_bar(colorize(depth, depth_range), depth_range)
    atomic_write(written[0], lambda tmp: Image.fromarray(coloured).save(tmp, format="PNG"))
    atomic_write(written[1], lambda tmp: depth_png(depth).save(tmp, format="PNG"))
    if npy:
        written.append(out_dir / f"{stem}.npy")
        atomic_write(written[-1], lambda tmp: _save_npy(tmp, depth))
    return written


def _save_npy(path: str, depth: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save would append .npy to a temporary name
        np.save(f, depth.astype(np.float32))
