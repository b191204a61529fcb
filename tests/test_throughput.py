"""The extraction pipeline's plumbing (issue 14): decoding worker processes, the
stat fast path in front of content hashing, and vectors unchanged by it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from cbir_cli.imageio.readers import ImageFolderDataset, read_chunks
from tests import fakes


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_decoding_workers_die_with_a_killed_main_process(tmp_path, image_folder):
    """kill -9 of `cbir extract` must not leave its decoding workers waiting forever."""
    folder = image_folder(60)
    code = ("import sys; from cbir_cli.pipeline.sync import sync_folder; "
            "from cbir_cli.pipeline.options import ExtractOptions; "
            "from cbir_cli.imageio import readers; import time; slow = readers.read_range; "
            "readers.read_range = lambda *a: (time.sleep(0.5), slow(*a))[1]; "
            f"sync_folder({str(folder)!r}, {str(tmp_path / 'out')!r}, model='test_tiny', "
            "options=ExtractOptions(workers=2, batch_size=4, device='cpu'))")
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "CBIR_CACHE": str(tmp_path / "c")})
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
        workers = child_pids(child.pid)
    assert len(workers) == 2, "the workers never started"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_read_chunks_in_order_with_failures(tmp_path, workers):
    paths = []
    for i in range(37):
        path = tmp_path / f"{i:03d}.jpg"
        if i % 10 == 3:
            path.write_bytes(b"not a jpeg")
        else:
            make_image(i, (90, 80)).save(path, quality=90)
        paths.append(str(path))
    from cbir_cli.models.preprocess import image_preprocessor
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR, get_model_config

    # The centre crop: one shape, so each chunk's pixels are one stacked array.
    config = get_model_config("test_tiny").with_descriptor(LEGACY_DESCRIPTOR)
    dataset = ImageFolderDataset(paths, image_preprocessor(config), 72)
    chunks = list(read_chunks(dataset, chunk=5, workers=workers, window=3))
    assert [i for c in chunks for i in c.pixel_indices] == [i for i in range(37) if i % 10 != 3]
    assert [i for c, _ in zip(chunks, range(99)) for i, _ in c.failures] == [3, 13, 23, 33]
    pixels = np.concatenate([c.pixels for c in chunks])
    assert pixels.shape == (33, 3, 64, 64) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0], dataset[0][1])


# -- the stat fast path in front of content hashing ---------------------------------


class CountingExecutor(fakes.CountingExecutor):
    """The local executor (decoding in this process), counting the files it is asked to hash."""

    def __init__(self):
        from cbir_cli.pipeline.local import LocalExecutor
        from cbir_cli.pipeline.options import ExtractOptions

        super().__init__(LocalExecutor(ExtractOptions(workers=0)))


def settled(folder: Path, age: float = 100.0) -> None:
    """Back-date every file, as if written long before the run."""
    past = time.time() - age
    for path in folder.iterdir():
        os.utime(path, (past, past))


def test_rerun_hashes_only_changed_files(tmp_path, image_folder, tiny_embedder):
    from cbir_cli.pipeline.statcache import STAT_CACHE
    from cbir_cli.pipeline.sync import sync_folder
    from cbir_cli.store.feature_store import FeatureStore

    folder = image_folder(6)
    settled(folder)
    store_dir = tmp_path / "store"

    def run():
        executor = CountingExecutor()
        summary = sync_folder(folder, store_dir, embedder=tiny_embedder, executor=executor)
        return summary, sorted(Path(p).name for p in executor.hashed)

    summary, hashed = run()
    assert summary.embedded == 6 and len(hashed) == 6 and (store_dir / STAT_CACHE).is_file()
    summary, hashed = run()
    assert hashed == [] and summary.unchanged == 6 and summary.embedded == 0

    # Same size, same mtime restored, new content: ctime still gives it away, and
    # the content hash decides.
    target = folder / "img_002.jpg"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    # touched only: hashed again, found unchanged
    os.utime(folder / "img_004.jpg")
    summary, hashed = run()
    assert hashed == ["img_002.jpg", "img_004.jpg"]
    assert summary.updated == 1 and summary.embedded == 1 and summary.unchanged == 5

    # An unreadable cache (or an older store without one) means: hash everything once.
    (store_dir / STAT_CACHE).write_text("{not json")
    summary, hashed = run()
    assert len(hashed) == 6 and summary.unchanged == 6
    # A rebuild trusts nothing about the old state.
    executor = CountingExecutor()
    sync_folder(folder, store_dir, embedder=tiny_embedder, executor=executor, rebuild=True)
    assert len(executor.hashed) == 6
    assert FeatureStore.open(store_dir).count == 6


def test_files_written_just_now_are_not_trusted(tmp_path, image_folder, tiny_embedder):
    """A file modified in the same timestamp tick as our read could change again
    unseen: it is hashed again next time (git's racily-clean rule)."""
    from cbir_cli.pipeline.sync import sync_folder

    folder = image_folder(3)  # mtimes: now
    executor = CountingExecutor()
    sync_folder(folder, tmp_path / "store", embedder=tiny_embedder, executor=executor)
    again = CountingExecutor()
    sync_folder(folder, tmp_path / "store", embedder=tiny_embedder, executor=again)
    assert len(again.hashed) == 3


# -- large stores: compact rows, streamed vectors ---------------------------------------


def small_store(tmp_path: Path):
    from cbir_cli.models.loading import model_fingerprint
    from cbir_cli.store.feature_store import FeatureStore

    store = FeatureStore.create(tmp_path / "store", model_fingerprint("test_tiny"))
    rng = np.random.default_rng(0)
    for shard in range(3):
        vectors = rng.standard_normal((5, 256)).astype(np.float32)
        store.add_shard(vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                        [(f"/photos/é_{shard}_{i}.jpg", f"{shard * 5 + i:064x}", 100 + i) for i in range(5)])
    store.remove_paths(["/photos/é_0_1.jpg", "/photos/é_2_4.jpg"])
    store.commit()
    return FeatureStore.open(tmp_path / "store")


def test_row_table_is_the_live_rows(tmp_path):
    from cbir_cli.store.vectors import RowTable

    store = small_store(tmp_path)
    table = RowTable.from_store(store)
    rows = store.live_rows()
    assert list(table) == rows and len(table) == 13 and table[-1] == rows[-1] and table[2:4] == rows[2:4]
    assert table.position(rows[5].id) == 5
    with pytest.raises(KeyError):
        table.position(1)  # tombstoned
    assert not store._rows_cache or len(store._rows_cache) == 3  # only live_rows() above cached objects


@pytest.mark.parametrize("dense_span", [4, 0])  # 0: every read row by row
def test_verified_shard_reads_match_and_refuse_damage(tmp_path, monkeypatch, dense_span):
    from cbir_cli.errors import CorruptStoreError
    from cbir_cli.store import vectors as vectors_module
    from cbir_cli.store.vectors import ShardVectors

    monkeypatch.setattr(vectors_module, "DENSE_SPAN", dense_span)
    store = small_store(tmp_path)
    expected = store.load_vectors()
    for verified in (False, True):
        vectors = ShardVectors(store, verified=verified)
        np.testing.assert_array_equal(vectors[np.arange(13)], expected)
        np.testing.assert_array_equal(vectors[np.array([12, 0, 7])], expected[[12, 0, 7]])
    path, _ = store.shard_paths(store.manifest["shards"][1])
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="checksum"):
        ShardVectors(store, verified=True)


# -- preprocessing: batched on the device, box-resampled on the CPU -------------------


# Distinct images, some of one shape (copied into the padded batch together), in no order.
SIZES = [(333, 250), (250, 333), (300, 300), (333, 250), (640, 97), (257, 256), (500, 700), (160, 120),
         (333, 250), (90, 72), (160, 120)]


# None: one group; 1: one image per group; the last: groups that split a run of equal shapes.
@pytest.mark.parametrize("group_bytes", [None, 1, 2 * 3 * 333 * 250 * 4])
def test_batched_resize_matches_torchvision_per_image(monkeypatch, group_bytes):
    import torch
    import torchvision.transforms.v2.functional as F

    from cbir_cli.imageio import batched_resize

    if group_bytes is not None:  # one image per group: the grouping must not matter
        monkeypatch.setattr(batched_resize, "GROUP_BYTES", group_bytes)
    images = [torch.from_numpy(np.array(make_image(i, size))).permute(2, 0, 1).contiguous()
              for i, size in enumerate(SIZES)]
    out = batched_resize.resize_crop_batch(images, 72, 64)
    assert out.shape == (len(SIZES), 3, 64, 64) and out.dtype == torch.uint8
    for image, ours in zip(images, out):
        # torchvision's float path (what it does on CUDA) and its uint8 path (= Pillow)
        reference = F.center_crop(F.resize(image.float(), [72], antialias=True), [64]).round().clamp(0, 255)
        exact = F.center_crop(F.resize(image, [72], antialias=True), [64])
        assert (ours.float() - reference).abs().max() <= 1
        assert (ours.int() - exact.int()).abs().max() <= 1 and (ours.float() - exact.float()).abs().mean() < 0.2
    # the comparison can fail: neighbours differ
    assert (out[0].float() - out[1].float()).abs().mean() > 10


@pytest.mark.real
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_real_photos_same_vectors_as_before(shared_dir):
    """Issue 14 changed the CPU preprocessing (box resampling) and the device one
    (batched resize): vectors of real photos stay within cosine 0.999 of the
    reference preprocessing (torchvision resize -> center_crop of Pillow's decode)."""
    from conftest import mobilenet_weights_path

    if mobilenet_weights_path() is None:
        pytest.skip("MobileNetV2 weights not installed (run `cbir weights install mobilenet_v2`)")
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.io import ImageReadMode, decode_jpeg

    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images
    from cbir_cli.imageio.gpu_decode import DeviceJpegDecoder
    from cbir_cli.models.loading import load_embedder

    files = list_images(shared_dir / "datasets" / "oxford17flowers")[::43] + \
        list_images(shared_dir / "datasets" / "ukbench_mini")[::7]
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR

    # The centre crop: what both the box-resampled CPU path and the device decoder make.
    embedder = load_embedder("mobilenet_v2", device="cpu", runtime="onnx", descriptor=LEGACY_DESCRIPTOR)
    config = embedder.config
    images = [load_image(f, draft_size=config.resize_size) for f in files]
    reference = np.stack([TF.pil_to_tensor(TF.center_crop(TF.resize(img, config.resize_size, antialias=True),
                                                          config.input_size)).numpy() for img in images])
    cpu = np.stack([embedder.preprocess(img) for img in images])
    decoder = DeviceJpegDecoder(None, config, "cpu")
    device = decoder.resize_crop([decode_jpeg(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8),
                                              mode=ImageReadMode.RGB)
                                  for f in files])
    expected = embedder.embed(reference)
    for name, pixels in (("cpu", cpu), ("device", torch.stack(device).numpy())):
        cosine = (embedder.embed(pixels) * expected).sum(axis=1)
        assert cosine.min() >= 0.999, (name, cosine.min())


# -- a new store: hashing runs beside the embedding ------------------------------------


class HashAfterEmbedStarts(CountingExecutor):
    """Hashing that cannot finish before the first batch reaches the model: with
    hashing in front of the pipeline (as before) this run would wait forever."""

    def __init__(self):
        super().__init__()
        self.embedding = threading.Event()

    def hash_files(self, paths):
        results = list(super().hash_files(paths))
        yield results[0]
        if not self.embedding.wait(timeout=30):
            raise AssertionError("hashing had to finish before any image was embedded")
        yield from results[1:]

    def embed(self, items, request, sink, on_failure):
        self.embedding.set()
        return self.inner.embed(items, request, sink, on_failure)


def test_new_store_embeds_while_hashing(tmp_path, image_folder, tiny_embedder):
    import hashlib

    from cbir_cli.pipeline.sync import sync_folder
    from cbir_cli.store.feature_store import FeatureStore

    folder = image_folder(10)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    skipped: list[tuple[str, str]] = []
    summary = sync_folder(folder, tmp_path / "store", embedder=tiny_embedder, executor=HashAfterEmbedStarts(),
                          on_skip=lambda p, r: skipped.append((Path(p).name, r)))
    assert summary.added == summary.embedded == 10 and [n for n, _ in skipped] == ["broken.jpg"]
    store = FeatureStore.open(tmp_path / "store")
    for row in store.live_rows():  # every row got its file's hash and size
        data = Path(row.path).read_bytes()
        assert row.sha256 == hashlib.sha256(data).hexdigest() and row.size == len(data)
    # The broken file is remembered with its hash: not decoded again next time.
    remembered = store.manifest["skipped"][str(folder / "broken.jpg")]
    assert remembered["sha256"] == hashlib.sha256((folder / "broken.jpg").read_bytes()).hexdigest()
    again = sync_folder(folder, tmp_path / "store", embedder=tiny_embedder, executor=CountingExecutor())
    assert again.unchanged == 10 and again.skipped == 1 and again.embedded == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_new_store_never_hands_a_pipe_to_the_readers(tmp_path, image_folder, tiny_embedder):
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    folder = image_folder(3)
    os.mkfifo(folder / "pipe.jpg")
    skipped: list[tuple[str, str]] = []
    summary = sync_folder(folder, tmp_path / "store", embedder=tiny_embedder,
                          options=ExtractOptions(workers=2, batch_size=2),
                          on_skip=lambda p, r: skipped.append((Path(p).name, r)))
    assert summary.added == 3 and skipped == [("pipe.jpg", "not a regular file (pipe, socket or device)")]


MMAPPED_GROWTH_CODE = """
import ctypes, sys
import numpy as np
from cbir_cli.imageio.readers import ImageFolderDataset, read_chunks

class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo

def mmapped_growth(_image):
    # Bytes of fresh mmap regions that one 3 MB buffer (a large photo's pixels) takes.
    before = libc.mallinfo2().hblkhd
    pixels = np.ones(3 << 20, np.uint8)
    return np.array([libc.mallinfo2().hblkhd - before], dtype=np.int64) + 0 * pixels[:1]

dataset = ImageFolderDataset([sys.argv[1]], mmapped_growth, None)
chunk, = read_chunks(dataset, chunk=1, workers=1, window=1)
print(int(np.asarray(chunk.pixels)[0][0]))  # in a decoding worker
# Then in this process, whose allocator settings are untouched (first: a freed
# mmapped buffer raises glibc's threshold, and forked workers would inherit that).
print(int(mmapped_growth(None)[0]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")
def test_decoding_workers_keep_freed_pixel_buffers(tmp_path):
    """A worker serves a large photo's buffers from memory it keeps, not from fresh
    mmap pages faulted in and unmapped per image (allocator.reuse_large_buffers).
    Measured in a fresh interpreter, whose allocator has not adapted yet: the same
    allocation there is mmapped, which shows the check can fail."""
    image = tmp_path / "a.png"
    make_image(0).save(image)
    out = subprocess.run([sys.executable, "-c", MMAPPED_GROWTH_CODE, str(image)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    in_worker, in_main = (int(line) for line in out.stdout.split())
    assert in_main >= 3 << 20
    assert in_worker == 0


# -- the store written on a thread of its own ------------------------------------


class SlowSink:
    """Records what reaches it, from which thread; its first write waits until the
    model has been asked for batch ``wait_for_batch`` (a sink written on the main
    thread blocks the main thread before it hands that batch to the model)."""

    def __init__(self, embedder: fakes.FakeEmbedder, wait_for_batch: int, fail_at: int | None = None) -> None:
        self.embedder, self.wait_for_batch, self.fail_at = embedder, wait_for_batch, fail_at
        self.added: list[str] = []
        self.threads: set[str] = set()
        self.waited_ok: bool | None = None

    def add(self, vectors, items) -> None:
        self.threads.add(threading.current_thread().name)
        if self.waited_ok is None:
            deadline = time.monotonic() + 5
            while self.embedder.batches < self.wait_for_batch and time.monotonic() < deadline:
                time.sleep(0.01)
            self.waited_ok = self.embedder.batches >= self.wait_for_batch
        if self.fail_at is not None and len(self.added) >= self.fail_at:
            raise OSError(28, "No space left on device")
        assert len(vectors) == len(items)
        self.added.extend(path for path, _, _ in items)


def run_local(folder: Path, sink, on_failure=lambda i, reason: None):
    from cbir_cli.pipeline.executor import EmbedRequest
    from cbir_cli.pipeline.local import LocalExecutor
    from cbir_cli.pipeline.options import ExtractOptions

    paths = sorted(str(p) for p in folder.iterdir())
    items = [(p, "", 0) for p in paths]
    executor = LocalExecutor(ExtractOptions(workers=0, batch_size=2, progress=False))
    return paths, executor.embed(items, EmbedRequest("fake", embedder=sink.embedder), sink, on_failure)


def test_the_store_is_written_off_the_main_thread_while_batches_go_on(image_folder):
    """Vectors arrive in order, on the writer thread, and a slow write does not stop
    the main thread from handing the model its next batches."""
    folder = image_folder(12)
    sink = SlowSink(fakes.FakeEmbedder(), wait_for_batch=5)
    paths, embedded = run_local(folder, sink)
    assert sink.waited_ok is True  # the main thread went on while the first write waited
    assert embedded == 12 and sink.added == paths
    assert threading.main_thread().name not in sink.threads and len(sink.threads) == 1


def test_a_failed_write_stops_the_run_and_is_raised(image_folder):
    folder = image_folder(12)
    sink = SlowSink(fakes.FakeEmbedder(), wait_for_batch=0, fail_at=4)
    with pytest.raises(OSError, match="No space left"):
        run_local(folder, sink)
    assert len(sink.added) == 4  # nothing written after the failed write


def test_failures_reach_the_callback_in_order_on_the_writer_thread(image_folder):
    folder = image_folder(6)
    (folder / "img_002.jpg").write_bytes(b"not a jpeg")
    (folder / "img_005.jpg").write_bytes(b"")
    seen: list[tuple[int, str]] = []
    sink = SlowSink(fakes.FakeEmbedder(), wait_for_batch=0)
    paths, embedded = run_local(folder, sink, lambda i, reason: seen.append((i, threading.current_thread().name)))
    assert embedded == 4 and [i for i, _ in seen] == [2, 5]
    assert all(name != threading.main_thread().name for _, name in seen)
    assert sink.added == [p for k, p in enumerate(paths) if k not in (2, 5)]
