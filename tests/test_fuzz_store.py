"""Fuzz every file the store reads (issue 10, item 4): the manifest, store.json, the
rows files, the shards, the saved search index and its meta, the DBA vectors
re-ranking reads and their meta get truncated, random
bytes, flipped bytes, wrong JSON types or are deleted, one file per case, seeded.

Whatever the damage: no operation raises anything but a one-line CbirError,
`cbir check` names the damaged file, a plain re-run that succeeds leaves a
consistent index, and `--rebuild` always repairs it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.check import check_index
from cbir_cli.search.rerank import RerankSettings
from cbir_cli.search.searcher import Searcher

OPTIONS = ExtractOptions(workers=0, batch_size=2, shard_size=2)
N_IMAGES = 3
CASES = 200
SEED = 10
FILES = ["manifest.json", ".manifest-checked", "store.json", "shards/shard-000001.npy", "shards/shard-000001.rows.json",
         "shards/shard-000002.npy", "shards/shard-000002.rows.json", "index/index.json", "index/index.faiss",
         "index/dba.json", "index/dba.npy", "index/dba-neighbours.npy"]  # DBA: re-ranking's vectors
WRONG_VALUES = ["x", [], {}, None, 1.5, -1, True, 2**70, "../../etc/passwd", [1, "a"], {"a": None}]


def json_paths(node, prefix=()):
    """Every (key/index path) in a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from json_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from json_paths(value, (*prefix, i))


def wrong_types(data: bytes, rng: random.Random) -> bytes:
    doc = json.loads(data)
    path = rng.choice(list(json_paths(doc)))
    value = rng.choice(WRONG_VALUES)
    if not path:
        return json.dumps(value).encode()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return json.dumps(doc).encode()


def mutate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    kinds = ["truncate", "random", "flip", "empty", "delete"] + ["types"] * 3 * path.name.endswith(".json")
    kind = rng.choice(kinds)
    if kind == "delete":
        path.unlink()
        return kind
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "random":
        data = rng.randbytes(len(data))
    elif kind == "flip":
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        data = bytes(data)
    elif kind == "empty":
        data = b""
    else:
        data = wrong_types(data, rng)
    path.write_bytes(data)
    return kind


def only_domain_errors(run):
    """Run ``run()``; True if it worked, False if it raised a CbirError; anything
    else (a traceback for the user) fails the test."""
    try:
        run()
    except CbirError as exc:
        assert "\n" not in str(exc)
        return False
    return True


class MemoEmbedder:
    """The tiny model, each distinct image embedded once: the fuzzer rebuilds the
    same 3 images hundreds of times (the vectors are the real model's)."""

    def __init__(self, inner) -> None:
        self.inner, self.config, self.preprocess = inner, inner.config, inner.preprocess
        self.device, self.on_cuda = getattr(inner, "device", None), False
        self.memo: dict[bytes, object] = {}

    def fingerprint(self):
        return self.inner.fingerprint()

    def embed(self, batch):
        import numpy as np

        rows = list(batch)  # arrays, or tuples of one array per scale (see models.scales)
        keys = [tuple((np.shape(a), np.asarray(a).tobytes()) for a in (row if isinstance(row, tuple) else (row,)))
                for row in rows]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        if missing:
            for i, vector in zip(missing, self.inner.embed([rows[i] for i in missing])):
                self.memo[keys[i]] = vector
        return np.stack([self.memo[key] for key in keys])


@pytest.fixture(scope="module")
def memo_embedder(tiny_embedder):
    return MemoEmbedder(tiny_embedder)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_embedder):
    """(images folder, a healthy index: 3 images in 2 shards, saved search index)."""
    from conftest import make_image

    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        make_image(i).save(folder / f"img_{i:03d}.jpg", quality=90)
    index_folder(folder, root / "index", embedder=tiny_embedder, options=OPTIONS)
    assert sorted(str(p.relative_to(root / "index")) for p in (root / "index").rglob("*")
                  if p.is_file() and p.name != ".lock") == sorted(FILES)
    return folder, root / "index"


def test_every_store_file_fuzzed_never_a_traceback_and_rebuild_always_repairs(pristine, memo_embedder, tmp_path,
                                                                              monkeypatch):
    import os

    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is test_crash's subject; here it only costs time
    folder, source = pristine
    tiny_embedder = memo_embedder
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        index_dir = tmp_path / f"case{case}"
        shutil.copytree(source, index_dir)
        name = FILES[case % len(FILES)]
        kind = mutate(index_dir / name, rng)
        where = f"case {case}: {kind} {name}"

        report = check_index(index_dir)  # never raises
        if not report.ok:
            damaged = Path(name).name if not name.startswith("manifest") else ""
            assert any(damaged in p and str(index_dir) in p for p in report.problems), (where, report.problems)
        opened = only_domain_errors(lambda d=index_dir: Searcher.open(d, embedder=tiny_embedder,
                                                                      rerank=RerankSettings()).search_ids([0], 2))
        repaired = only_domain_errors(lambda d=index_dir: index_folder(folder, d, embedder=tiny_embedder,
                                                                         options=OPTIONS))
        if repaired:
            assert check_index(index_dir).ok, (where, check_index(index_dir).problems)
        index_folder(folder, index_dir, embedder=tiny_embedder, options=OPTIONS, rebuild=True)
        after = check_index(index_dir)
        assert after.ok and after.count == N_IMAGES, (where, after.problems)
        key = f"check {'ok' if report.ok else 'problem'}, open {'ok' if opened else 'refused'}, " \
              f"re-run {'repaired' if repaired else 'refused'}"
        outcomes[key] = outcomes.get(key, 0) + 1
        shutil.rmtree(index_dir)
    # The fuzzer really damaged things (not only benign edits) and re-runs repaired most.
    assert sum(n for k, n in outcomes.items() if "check problem" in k) > CASES // 2, outcomes
    assert sum(n for k, n in outcomes.items() if "re-run repaired" in k) > CASES // 2, outcomes


@pytest.mark.parametrize("damage", ['[]', '"x"', '{"generation": "x"}', "garbage{"])
def test_cli_on_a_damaged_index_json_answers_one_line_and_rebuild_repairs(pristine, tmp_path, damage):
    folder, source = pristine
    index_dir = tmp_path / "index"
    shutil.copytree(source, index_dir)
    (index_dir / "index" / "index.json").write_text(damage)
    runner = CliRunner()
    for args in (["check"], ["query", str(folder / "img_000.jpg")]):
        result = runner.invoke(app, [*args, "--index", str(index_dir)])
        assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
        assert "index.json" in result.stderr and "Traceback" not in result.output
    rebuilt = runner.invoke(app, ["index", str(folder), "--index", str(index_dir), "--rebuild", "--model",
                                  "test_tiny", "--workers", "0"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert runner.invoke(app, ["check", "--index", str(index_dir)]).exit_code == 0
