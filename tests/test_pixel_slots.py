"""Decoded pixels from the workers through shared memory (imageio.pixel_slots)."""

from __future__ import annotations

import multiprocessing
import sys

import numpy as np
import pytest
from conftest import make_image

from cbir_cli.imageio import readers
from cbir_cli.imageio.pixel_slots import PixelSlots, SlotPixels
from cbir_cli.imageio.readers import ImageFolderDataset, read_chunks, read_range

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the slots need fork")


def pixels(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_same_pixels(got, expected) -> None:
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected)
        return
    assert isinstance(got, list) and len(got) == len(expected)
    for one, want in zip(got, expected):
        if isinstance(want, tuple):
            assert isinstance(one, tuple) and len(one) == len(want)
            for a, b in zip(one, want):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(one, want)


@pytest.mark.parametrize("layout", ["stacked", "ragged", "scales"])
def test_every_layout_comes_back_as_it_went_in(layout):
    stacked = pixels(0, 4, 3, 8, 8)
    value = {"stacked": stacked,
             "ragged": [pixels(1, 3, 8, 12), pixels(2, 3, 16, 8)],
             "scales": [(pixels(3, 3, 8, 12), pixels(4, 3, 12, 16)), (pixels(5, 3, 12, 8), pixels(6, 3, 16, 12))]}
    slots = PixelSlots(2, slot_bytes=1 << 16)
    placed = slots.put(1, value[layout])
    assert isinstance(placed, SlotPixels) and placed.slot == 1
    taken = slots.take(placed)
    assert_same_pixels(taken, value[layout])
    slots.put(1, [np.zeros_like(stacked)])  # the slot reused: what was taken is a copy
    assert_same_pixels(taken, value[layout])


def test_what_does_not_fit_or_is_not_uint8_is_left_to_the_pickle():
    slots = PixelSlots(1, slot_bytes=1000)
    assert slots.put(0, pixels(0, 3, 20, 20)) is None  # 1,200 bytes
    assert slots.put(0, np.zeros((3, 4, 4), dtype=np.int64)) is None
    assert slots.put(0, [(pixels(1, 3, 4, 4), np.zeros((3, 2, 2), dtype=np.float32))]) is None
    assert slots.put(0, pixels(2, 3, 10, 10)) is not None
    with pytest.raises(IndexError):
        slots.put(1, pixels(2, 3, 2, 2))


def _write_in_child(slots: PixelSlots, queue) -> None:
    queue.put(slots.put(0, [pixels(7, 3, 9, 11), pixels(8, 3, 5, 5)]))


@linux_only
def test_a_forked_process_writes_what_the_parent_reads():
    """The mapping is shared, not copied on write: the point of mapping it before fork."""
    context = multiprocessing.get_context("fork")
    slots, queue = PixelSlots(1, slot_bytes=1 << 12), context.Queue()
    child = context.Process(target=_write_in_child, args=(slots, queue))
    child.start()
    placed = queue.get(timeout=60)
    child.join(60)
    assert_same_pixels(slots.take(placed), [pixels(7, 3, 9, 11), pixels(8, 3, 5, 5)])


def photo_dataset(tmp_path, descriptor: str) -> ImageFolderDataset:
    from cbir_cli.models.preprocess import image_preprocessor
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR, get_model_config

    paths = []
    for i in range(23):
        path = tmp_path / f"{i:03d}.jpg"
        if i == 9:
            path.write_bytes(b"not a jpeg")
        else:
            make_image(i, (90 + 7 * (i % 4), 80 + 5 * (i % 3))).save(path, quality=90)
        paths.append(str(path))
    config = get_model_config("test_tiny")
    if descriptor == "legacy":
        config = config.with_descriptor(LEGACY_DESCRIPTOR)  # one shape: stacked arrays
    return ImageFolderDataset(paths, image_preprocessor(config), config.draft_size)


@linux_only
@pytest.mark.parametrize("descriptor", ["legacy", "default"])
def test_chunks_through_the_slots_equal_decoding_in_process(tmp_path, descriptor):
    """Two slots for eight tasks: each slot is reused while the others are written,
    and every task's pixels still arrive intact, in order."""
    dataset = photo_dataset(tmp_path, descriptor)
    expected = list(read_chunks(dataset, chunk=3, workers=0, window=2))
    first = expected[0].pixels  # legacy: one stacked array; default: two scales per image
    assert isinstance(first, np.ndarray) if descriptor == "legacy" else isinstance(first[0], tuple)
    got = list(read_chunks(dataset, chunk=3, workers=2, window=2))
    assert len(got) == len(expected) == 8
    for one, want in zip(got, expected):
        assert (one.pixel_indices, one.failures) == (want.pixel_indices, want.failures)
        assert_same_pixels(one.pixels, want.pixels)
    assert [i for c in got for i, _ in c.failures] == [9]


def test_a_worker_task_hands_its_pixels_over_in_its_slot(tmp_path, monkeypatch):
    """What read_chunks' workers run: the pixels go to the slot, only their layout is pickled."""
    dataset = photo_dataset(tmp_path, "default")
    slots = PixelSlots(3, slot_bytes=1 << 22)
    monkeypatch.setattr(readers, "_WORKER_DATASET", dataset)
    monkeypatch.setattr(readers, "_WORKER_SLOTS", slots)
    chunk = readers._read_range((0, 4, 2))
    assert isinstance(chunk.pixels, SlotPixels) and chunk.pixels.slot == 2
    assert_same_pixels(slots.take(chunk.pixels), read_range(dataset, 0, 4).pixels)
    unslotted = readers._read_range((0, 4, None))
    assert_same_pixels(unslotted.pixels, read_range(dataset, 0, 4).pixels)
