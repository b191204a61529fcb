"""Resize + centre-crop a whole batch of differently sized images in a few kernels.

The model's preprocessing (short side to ``resize_size`` with an antialiased
filter, centre crop ``crop``) is separable: each output row is a weighted sum of
source rows, each output column of source columns. For one image that is
``Wy @ image @ Wx.T`` with the filter weights of the *cropped* output rows and
columns only. Images of different sizes are zero-padded to the largest one in
the group and their weight matrices padded with zeros, so the whole group is two
batched matmuls, whatever the mix of sizes, instead of one resize call (and its
Python dispatch) per image or per shape: per-image resizing was one of the costs
of the ``--decode gpu`` pipeline (issue 14's profile list).

The weights are Pillow's (= torchvision's antialiased tensor path): a triangle
filter (bilinear) stretched by the downscale factor, centred at
``(i + 0.5) * scale``, normalised per output pixel. Arithmetic is float32 with
one rounding at the end (torchvision on CUDA also resizes in float), so pixels
match Pillow's within 1/255 and vectors within cosine 0.999 (tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Padded float32 pixels per group (bytes): a batch of 12 Mpx photos is split
# into groups instead of allocating gigabytes (each group: a few kernels).
GROUP_BYTES = 1 << 30
# Filter half-width per unit of downscale: Pillow's bilinear (triangle) filter.
SUPPORTS = {"bilinear": 1.0}


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(new_w, new_h) with the short side at ``resize_size``, torchvision's rounding."""
    if width <= height:
        return resize_size, int(resize_size * height / width)
    return int(resize_size * width / height), resize_size


def _weights(in_sizes: torch.Tensor, out_sizes: torch.Tensor, offsets: torch.Tensor, crop: int,
             padded: int) -> torch.Tensor:
    """(n, crop, padded) float32: row ``j`` of image ``k`` holds the weights of output
    pixel ``offsets[k] + j`` (of a resize from ``in_sizes[k]`` to ``out_sizes[k]``)
    over the source pixels, zero beyond the image."""
    import torch

    device = in_sizes.device
    scale = (in_sizes.double() / out_sizes.double())[:, None, None]  # (n, 1, 1)
    stretch = torch.clamp(scale, min=1.0)  # downscaling widens the filter (antialiasing)
    out_index = offsets.double()[:, None, None] + torch.arange(crop, device=device, dtype=torch.float64)[None, :, None]
    centre = (out_index + 0.5) * scale  # (n, crop, 1), in source pixel units
    source = torch.arange(padded, device=device, dtype=torch.float64)[None, None, :] + 0.5
    weights = torch.clamp(1.0 - ((source - centre) / stretch).abs(), min=0.0)
    weights = weights * (source < in_sizes.double()[:, None, None])  # taps beyond the image are not there
    return (weights / weights.sum(dim=2, keepdim=True)).float()


def resize_crop_batch(images: Sequence[torch.Tensor], resize_size: int, crop: int,
                      interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (3, H_k, W_k) images (one device) -> uint8 (n, 3, crop, crop): short side
    to ``resize_size`` (antialiased), centre crop; see the module docstring."""
    import torch

    if interpolation not in SUPPORTS:
        raise ValueError(f"batched resize supports {', '.join(SUPPORTS)}, not {interpolation!r}")
    device = images[0].device
    out = torch.empty((len(images), 3, crop, crop), dtype=torch.uint8, device=device)
    # Groups of similar size (fewer padded pixels), each within GROUP_BYTES; sorted by
    # shape, so images of one shape are neighbours in their group. (The running
    # maxima keep this linear: it runs on the main thread for every batch.)
    order = sorted(range(len(images)), key=lambda k: (images[k].shape[1], images[k].shape[2]))
    group: list[int] = []
    height = width = 0
    for k in order:
        h, w = int(images[k].shape[1]), int(images[k].shape[2])
        if group and (len(group) + 1) * 3 * max(height, h) * max(width, w) * 4 > GROUP_BYTES:
            _resize_group(images, group, resize_size, crop, out)
            group, height, width = [], 0, 0
        group.append(k)
        height, width = max(height, h), max(width, w)
    if group:
        _resize_group(images, group, resize_size, crop, out)
    return out


def _resize_group(images: Sequence[torch.Tensor], group: list[int], resize_size: int, crop: int,
                  out: torch.Tensor) -> None:
    import torch

    device = images[group[0]].device
    heights = [int(images[k].shape[1]) for k in group]
    widths = [int(images[k].shape[2]) for k in group]
    sizes = [resized_size(w, h, resize_size) for w, h in zip(widths, heights)]
    for (new_w, new_h) in sizes:
        if crop > min(new_w, new_h):
            raise ValueError(f"crop {crop} larger than resized image {new_w}x{new_h}")
    padded = torch.zeros((len(group), 3, max(heights), max(widths)), dtype=torch.float32, device=device)
    # One copy per run of equal shapes (neighbours: the group is sorted by shape), not
    # one per image: per-image copies were most of this function's cost on the main
    # thread (bench/gpu_check.sh's profile on an H100).
    start = 0
    for end in range(1, len(group) + 1):
        if end == len(group) or (heights[end], widths[end]) != (heights[start], widths[start]):
            padded[start:end, :, :heights[start], :widths[start]] = torch.stack([images[k] for k in group[start:end]])
            start = end

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    # The crop offsets, as the model's preprocessing rounds them.
    tops = [round((new_h - crop) / 2.0) for _, new_h in sizes]
    lefts = [round((new_w - crop) / 2.0) for new_w, _ in sizes]
    rows = _weights(tensor(heights), tensor([h for _, h in sizes]), tensor(tops), crop, max(heights))
    cols = _weights(tensor(widths), tensor([w for w, _ in sizes]), tensor(lefts), crop, max(widths))
    # (g, 3, H, W) @ (g, 1, W, crop) -> (g, 3, H, crop); (g, 1, crop, H) @ that -> (g, 3, crop, crop)
    resized = rows[:, None] @ (padded @ cols.transpose(1, 2)[:, None])
    out[tensor(group)] = resized.round_().clamp_(0, 255).to(torch.uint8)
