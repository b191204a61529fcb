"""What a reader loads from the derived files of an index is verified (issue 20,
item 4): a flipped byte in ``index/dba.npy`` falls back to the plain ranking with
one warning that says how to repair, never silently reorders results; the verdict
is remembered by the file's stamp, so a second query does not hash again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CorruptStoreError
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.store import verdicts

runner = CliRunner()


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Counts the verification hashes (the file names hashed); verdicts count
    from the moment a file is written (no racy window in tests)."""
    calls: list[str] = []
    real = verdicts.file_sha256

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(verdicts, "file_sha256", counting)
    monkeypatch.setattr(verdicts, "RACY_SECONDS", -1.0)
    return calls


def query(folder: Path, index_dir: Path, *flags: str):
    result = runner.invoke(app, ["query", str(folder / "img_003.jpg"), "--index", str(index_dir), "-k", "8",
                                 "--device", "cpu", "--json", *flags])
    assert result.exit_code == 0, result.output
    return [hit["id"] for hit in json.loads(result.stdout)[0]["results"]], result.stderr


def flip(path: Path, offset: int = -5) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    return original


def test_a_flipped_byte_in_dba_vectors_falls_back_to_the_plain_ranking(image_folder, tmp_path, hashes):
    folder, index_dir = image_folder(10), tmp_path / "idx"
    index_folder(folder, index_dir, model="test_tiny")
    dba = index_dir / "index" / "dba.npy"
    plain, _ = query(folder, index_dir, "--no-rerank")
    reranked, quiet = query(folder, index_dir)
    assert reranked != plain and "warning" not in quiet  # re-ranking changes this order
    original = flip(dba)
    damaged, stderr = query(folder, index_dir)
    assert damaged == plain
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "dba.npy: checksum mismatch" in warnings[0]
    assert "cbir check --repair" in warnings[0] and "Traceback" not in stderr
    dba.write_bytes(original)  # restored: re-ranked again
    assert query(folder, index_dir)[0] == reranked
    hashes.clear()
    assert query(folder, index_dir)[0] == reranked
    assert hashes == []  # the verdict for this stamp was remembered: nothing hashed again


def test_a_repair_makes_damaged_dba_vectors_again(image_folder, tmp_path, hashes):
    folder, index_dir = image_folder(8), tmp_path / "idx"
    index_folder(folder, index_dir, model="test_tiny")
    reranked, _ = query(folder, index_dir)
    flip(index_dir / "index" / "dba.npy")
    assert runner.invoke(app, ["check", "--index", str(index_dir)]).exit_code == 1
    assert runner.invoke(app, ["check", "--index", str(index_dir), "--repair"]).exit_code == 0
    assert runner.invoke(app, ["check", "--index", str(index_dir)]).exit_code == 0
    ids, stderr = query(folder, index_dir)
    assert ids == reranked and "warning" not in stderr


def test_the_saved_faiss_index_is_hashed_once_per_change(image_folder, tmp_path, hashes):
    from cbir_cli.search.faiss_backend import load_index
    from cbir_cli.store.feature_store import FeatureStore

    folder, index_dir = image_folder(6), tmp_path / "idx"
    index_folder(folder, index_dir, model="test_tiny")
    store = FeatureStore.open(index_dir)
    (index_dir / "index" / verdicts.VERDICTS).unlink(missing_ok=True)  # what the writer remembered
    hashes.clear()
    assert load_index(store) is not None and load_index(store) is not None
    assert hashes == ["index.faiss"]
    flip(index_dir / "index" / "index.faiss", offset=-3)
    with pytest.raises(CorruptStoreError, match=r"index\.faiss: checksum mismatch"):
        load_index(store)


def test_a_verdict_is_not_kept_for_a_file_changed_just_now(tmp_path, hashes, monkeypatch):
    import hashlib

    monkeypatch.setattr(verdicts, "RACY_SECONDS", 60.0)
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 100)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    verdicts.verify_file(path, digest, "meta.json")
    verdicts.verify_file(path, digest, "meta.json")
    assert hashes == ["data.bin", "data.bin"]  # in the racy window: hashed each time


def test_an_unwritable_record_is_ignored(tmp_path, hashes, monkeypatch):
    import hashlib

    path = tmp_path / "data.bin"
    path.write_bytes(b"y" * 100)
    (tmp_path / verdicts.VERDICTS).mkdir()  # cannot be read nor replaced by a file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verdicts.verify_file(path, digest, "meta.json")
    with pytest.raises(CorruptStoreError, match="checksum mismatch"):
        verdicts.verify_file(path, "0" * 64, "meta.json")


def test_serve_falls_back_to_the_plain_ranking_too(image_folder, tmp_path, hashes, caplog):
    from cbir_cli.serve.app import create_app

    folder, index_dir = image_folder(6), tmp_path / "idx"
    index_folder(folder, index_dir, model="test_tiny")
    flip(index_dir / "index" / "dba.npy")
    served = create_app(index_dir=index_dir, device="cpu").extensions["cbir"].current()
    assert served.backend.plain_only and served.backend.augmentation is None
    assert [r.getMessage() for r in caplog.records if "dba.npy" in r.getMessage()]
