"""Image loading and LLaVA-1.5 preprocessing with PIL-backed processors (no torchvision needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

AspectRatio = Literal["pad", "resize", "crop"]


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, centred, with the background colour (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def processor_input_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the tensors the processor produces."""
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop:
        return int(crop["height"]), int(crop["width"])
    size = image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size["shortest_edge"])
    return edge, edge


@dataclass
class ImageTransform:
    """Open an image file and turn it into `pixel_values` [3, H, W] the LLaVA-1.5 way."""

    image_processor: Any
    aspect_ratio: AspectRatio = "pad"

    def __post_init__(self) -> None:
        if self.aspect_ratio not in ("pad", "resize", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad', 'resize' or 'crop', got {self.aspect_ratio!r}")
        mean = self.image_processor.image_mean
        # LLaVA's `tuple(int(x * 255) for x in image_mean)`: truncated, (122, 116, 104) for CLIP.
        self.background = tuple(int(255 * m) for m in mean)
        self.size = processor_input_size(self.image_processor)

    def load(self, path: str | os.PathLike) -> Image.Image:
        """Open and decode fully now, so a broken file fails here and not inside the processor."""
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one RGB image."""
        if self.aspect_ratio == "pad":
            image = expand_to_square(image, self.background)
        elif self.aspect_ratio == "resize":
            height, width = self.size
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        # 'crop' leaves the processor's own resize-shortest-edge + centre crop
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def image_token_count(processor: Any) -> int:
    """Image tokens per image implied by a LlavaProcessor (the count `<image>` expands to)."""
    if getattr(processor, "patch_size", None) is None:
        raise ValueError("the processor has no patch_size; cannot tell how many image tokens an image needs")
    height, width = processor_input_size(processor.image_processor)
    count = (height // processor.patch_size) * (width // processor.patch_size)
    count += int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        count -= 1  # the CLS feature is dropped
    return count
