"""How a prediction is made: `InferenceMode` (whole or slide, test-time scales and flip), the
settings that inference.py follows and that every report and result name states (inference.py
explains the modes)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dinokit.data.resize import round_to_patch
from model_config import PATCH_SIZE

MODES = ("whole", "slide")


def default_crop(patch_size: int) -> int:
    """The slide window of each paper's protocol: DINOv2 518 (37 patches of 14), DINOv3 512 (32 of
    16; a ConvNeXt's 16 of 32): the largest multiple of the patch size up to 518."""
    return 518 // patch_size * patch_size


@dataclass(frozen=True)
class InferenceMode:
    """How a prediction is made (see the module docstring)."""

    mode: str = "whole"
    imgsz: tuple[int, int] | None = None  # whole: (W, H) every image is resized to (Predictor: the training size)
    native: bool = False  # whole: each image at its own size instead
    short_side: int = 512  # slide: the short side is resized to this
    crop: int | None = None  # slide: window side (None: the backbone's own, `for_patch`)
    stride: int = 341  # slide: window step
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    patch_size: int = PATCH_SIZE  # the model's (for_patch): no pass is smaller than one patch

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"--scales must be positive numbers, got {list(self.scales)}")
        if self.mode == "slide" and self.crop is not None and not 0 < self.stride <= self.crop:
            raise ValueError(
                f"--stride {self.stride} must be in [1, --crop {self.crop}] (windows must overlap or touch)"
            )
        if self.mode == "slide" and min(self.crop or self.patch_size, self.short_side) < self.patch_size:
            raise ValueError(f"--crop and --short-side must be at least the patch size {self.patch_size}")

    def for_patch(self, patch_size: int) -> InferenceMode:
        """This mode for a model of `patch_size`: `imgsz` rounded up to a multiple of it (640 -> 644
        for a /14 backbone, 640 for a /16 one); the default window the papers' (`default_crop`)."""
        imgsz = round_to_patch(self.imgsz, patch_size) if self.imgsz is not None else None
        crop = self.crop if self.crop is not None else default_crop(patch_size)
        return replace(self, imgsz=imgsz, crop=crop, patch_size=patch_size)

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
            return max(self.patch_size, round(self.imgsz[1] * scale)), max(
                self.patch_size, round(self.imgsz[0] * scale)
            )
        else:
            factor = scale
        return max(self.patch_size, round(height * factor)), max(self.patch_size, round(width * factor))
