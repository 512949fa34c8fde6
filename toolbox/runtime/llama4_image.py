"""Llama 4 image preprocessing (image -> pixel_values tiles) from a preprocessor_config.json.

transformers' Llama4ImageProcessor is the reference and is used when it can be imported; it needs
torchvision, which does not import beside every torch build (PyPI's torchvision next to a local CPU
torch wheel fails with "operator torchvision::nms does not exist"). The fallback here follows the
same published steps with Pillow: choose the tile canvas (`max_patches` tiles of `size`, the smallest
upscale, else the least downscale, then the least area), resize without distortion (bilinear), pad
right/bottom with black, rescale and normalize in bfloat16 as transformers does, split into tiles
row-major and append a global tile (the whole image at `size`) when there is more than one.
Bilinear resampling of Pillow and torchvision may differ by one grey level on some pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def supported_canvases(max_patches: int, size: int) -> list[tuple[int, int]]:
    """Every (height, width) made of 1..max_patches tiles, grouped by aspect ratio as transformers orders them."""
    groups: dict[float, list[tuple[int, int]]] = {}
    for chunks in range(max_patches, 0, -1):
        for h in sorted(f for f in range(1, chunks + 1) if chunks % f == 0):
            groups.setdefault(h / (chunks // h), []).append((h, chunks // h))
    return [(h * size, w * size) for pairs in groups.values() for h, w in pairs]


def best_canvas(image_hw: tuple[int, int], canvases: list[tuple[int, int]], to_max: bool = False) -> tuple[int, int]:
    oh, ow = image_hw
    arr = np.array(canvases, dtype=np.float64)
    scales = np.minimum(arr[:, 0] / oh, arr[:, 1] / ow)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if up.size else scales[scales < 1].max()
    pick = arr[scales == chosen]
    best = pick[np.argmin(pick[:, 0] * pick[:, 1])] if len(pick) > 1 else pick[0]
    return int(best[0]), int(best[1])


def _fit(image_hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest size within target with the image's aspect ratio (transformers' rounding)."""
    oh, ow = image_hw
    th, tw = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return max(min(math.floor(oh * sw), th), 1), max(tw, 1)
    return max(th, 1), max(min(math.floor(ow * sh), tw), 1)


def _normalize(pixels: np.ndarray, settings: dict[str, Any]) -> Any:
    """uint8 [C, H, W] -> rescaled and normalized in bfloat16 (as transformers' Llama4 processor), float32 out."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.bfloat16) * float(settings["rescale_factor"])
    mean = torch.tensor(settings["image_mean"], dtype=torch.bfloat16)[:, None, None]
    std = torch.tensor(settings["image_std"], dtype=torch.bfloat16)[:, None, None]
    return ((x - mean) / std).float()


def _hf_processor(settings: dict[str, Any]) -> Any:
    """transformers' Llama4ImageProcessor with these settings, or None where torchvision cannot be used."""
    try:
        from transformers import Llama4ImageProcessor

        keys = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                "image_mean", "image_std", "max_patches", "resize_to_max_canvas")
        return Llama4ImageProcessor(**{k: settings[k] for k in keys if k in settings})
    except (ImportError, RuntimeError):  # torchvision missing, or built for another torch
        return None


def preprocess(image: Any, settings: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image -> (pixel_values [tiles, 3, S, S] float32, (tiles down, tiles across))."""
    proc = _hf_processor(settings)
    if proc is not None:
        out = proc(image, return_tensors="np")
        ratio = [int(r) for r in np.asarray(out["aspect_ratios"])[0]]
        return np.asarray(out["pixel_values"], dtype=np.float32), (ratio[0], ratio[1])
    import torch
    from PIL import Image

    size = int(settings["size"]["height"])
    img = image.convert("RGB")
    hw = (img.height, img.width)
    canvas = best_canvas(hw, supported_canvases(int(settings["max_patches"]), size),
                         bool(settings.get("resize_to_max_canvas")))
    limit = canvas if settings.get("resize_to_max_canvas") else (
        min(max(hw[0], size), canvas[0]), min(max(hw[1], size), canvas[1]))
    nh, nw = _fit(hw, limit)
    resample = Image.Resampling(int(settings.get("resample", 2)))
    small = np.asarray(img.resize((nw, nh), resample)).transpose(2, 0, 1)
    padded = np.zeros((3, *canvas), dtype=np.uint8)
    padded[:, :nh, :nw] = small
    rh, rw = canvas[0] // size, canvas[1] // size
    tiles = _normalize(padded, settings).reshape(3, rh, size, rw, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size,
                                                                                                       size)
    if rh * rw > 1:
        whole = np.asarray(img.resize((size, size), resample)).transpose(2, 0, 1)
        tiles = torch.cat([tiles, _normalize(whole, settings)[None]], dim=0)
    return tiles.numpy(), (rh, rw)


def image_prompt(aspect: tuple[int, int], tokens_per_tile: int) -> str:
    """The image's tokens in the prompt, laid out as transformers' Llama4Processor does (tiles, then the
    global tile after <|image|>); each <|patch|> takes one row of image_features."""
    rh, rw = aspect
    text = "<|image_start|>"
    if rh * rw > 1:
        for _ in range(rh):
            for x in range(rw):
                text += "<|patch|>" * tokens_per_tile + ("<|tile_x_separator|>" if x < rw - 1 else "")
            text += "<|tile_y_separator|>"
    return text + "<|image|>" + "<|patch|>" * tokens_per_tile + "<|image_end|>"


def load_image(path: str | Path) -> Any:
    """Open an image file with Pillow (decoding bounded by Pillow's decompression-bomb limit)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.copy()
