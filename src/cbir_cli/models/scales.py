"""Embedding a batch whose images differ in shape or come at several scales.

A batch is either a stacked uint8 ``(n, 3, H, W)`` array (every image one array of
one shape: the centre-crop input) or a list of per-image inputs, each an array or
a tuple of arrays, one per scale (see :mod:`.preprocess`). The model runs once per
group of arrays that share a shape -- never on padded inputs, which would change
the descriptors -- and each image's per-scale vectors (L2-normalised by the model)
are averaged and L2-normalised again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# uint8 (m, 3, H, W) -> float32 (m, dim), rows L2-normalised: one model run.
EmbedGroup = Callable[[Any], "np.ndarray"]


def embed_batch(batch: Any, embed_group: EmbedGroup, dim: int) -> np.ndarray:
    """float32 (n, dim), rows L2-normalised, for a batch of any of the forms above
    (a stacked array or tensor goes to ``embed_group`` as it is)."""
    import numpy as np

    if not isinstance(batch, (list, tuple)):
        return embed_group(batch)
    if not batch:
        return np.zeros((0, dim), dtype=np.float32)
    groups: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
    for row, item in enumerate(batch):
        for pixels in item if isinstance(item, tuple) else (item,):
            pixels = np.asarray(pixels)
            groups.setdefault(pixels.shape, []).append((row, pixels))
    total = np.zeros((len(batch), dim), dtype=np.float32)
    for members in groups.values():
        vectors = embed_group(np.stack([pixels for _, pixels in members]))
        np.add.at(total, [row for row, _ in members], vectors)
    norms = np.linalg.norm(total, axis=1, keepdims=True)
    return (total / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
