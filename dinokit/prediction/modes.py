"""How a prediction is made: `InferenceMode` (whole or slide, test-time scales and flip), the
settings that inference.py follows and that every report and result name states (inference.py
explains the modes)."""

from __future__ import annotations

from dataclasses import dataclass

from model_config import PATCH_SIZE

MODES = ("whole", "slide")


@dataclass(frozen=True)
class InferenceMode:
    """How a prediction is made (see the module docstring)."""

    mode: str = "whole"
    imgsz: tuple[int, int] | None = None  # whole: (W, H) every image is resized to (Predictor: the training size)
    native: bool = False  # whole: each image at its own size instead
    short_side: int = 512  # slide: the short side is resized to this
    crop: int = 518  # slide: window side
    stride: int = 341  # slide: window step
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"--scales must be positive numbers, got {list(self.scales)}")
        if self.mode == "slide" and not 0 < self.stride <= self.crop:
            raise ValueError(
                f"--stride {self.stride} must be in [1, --crop {self.crop}] (windows must overlap or touch)"
            )
        if self.mode == "slide" and min(self.crop, self.short_side) < PATCH_SIZE:
            raise ValueError(f"--crop and --short-side must be at least the patch size {PATCH_SIZE}")

    @property
    def passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> str:
        if self.mode == "whole":
            base = (
                "whole at each image's own size"
                if self.native or not self.imgsz
                else f"whole at {self.imgsz[0]}x{self.imgsz[1]}"
            )
        else:
            base = f"slide (short side {self.short_side}, crop {self.crop}, stride {self.stride})"
        tta = f", scales {' '.join(f'{s:g}' for s in self.scales)}" if self.scales != (1.0,) else ""
        return base + tta + (", + flip" if self.flip else "")

    def tag(self) -> str:
        """The mode in a file name: whole-644x644, whole-native, slide-512-518-341, + _ms0.75-1-1.25, + _flip."""
        if self.mode == "whole":
            base = "whole-native" if self.native or not self.imgsz else f"whole-{self.imgsz[0]}x{self.imgsz[1]}"
        else:
            base = f"slide-{self.short_side}-{self.crop}-{self.stride}"
        scales = f"_ms{'-'.join(f'{s:g}' for s in self.scales)}" if self.scales != (1.0,) else ""
        return base + scales + ("_flip" if self.flip else "")

    def pass_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """(height, width) the image is resized to for one pass at `scale`."""
        if self.mode == "slide":
            factor = self.short_side * scale / min(height, width)
        elif self.imgsz is not None and not self.native:
            return max(PATCH_SIZE, round(self.imgsz[1] * scale)), max(PATCH_SIZE, round(self.imgsz[0] * scale))
        else:
            factor = scale
        return max(PATCH_SIZE, round(height * factor)), max(PATCH_SIZE, round(width * factor))
