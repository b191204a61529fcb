"""A new store's Ray run as one streaming Ray Data job: the driver holds no list of
the files to embed.

For a store that holds nothing yet (a first run, a rebuild's successor) every
listed file is embedded whatever its content, so nothing needs planning on the
driver: the Ray executor's listing is a :class:`StreamedListing` -- the top folder's
sub-folders only -- and :func:`stream_new_store` runs

    units (the top folder's own files, each sub-folder) -> ``flat_map``: list + stat
    on a worker -> ``repartition``: blocks of exactly one shard -> ``map_batches``:
    hash + decode on a worker -> ``map_batches``: the model actor pool writes each
    shard into staging

and consumes that stream with ``iter_batches``, adopting and committing each
part as it arrives: the driver's memory is the batch in flight, whatever the
number of files, and the first shard is committed while later folders are still
being listed. The stat cache (:mod:`.statcache`) is written as the parts arrive,
entry by entry, into a file that replaces ``stat-cache.json`` at the end.

A store that holds rows is planned as before (its listing is then taken in full,
once: :meth:`StreamedListing.files`), since unchanged, moved and deleted files
are known only against what is stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from ..errors import CbirError
from ..imageio.files import ImageList, listing_error
from .options import ExtractSummary
from .ray_tasks import FOLDER_ROW
from .statcache import FORMAT, STAT_CACHE

if TYPE_CHECKING:
    import numpy as np

    from ..store.transaction import WriteTransaction
    from .executor import EmbedRequest

SkipCallback = Callable[[str, str], None]
# (listing, txn, request, summary, skip): the executor's streamed run.
StreamRun = Callable[["StreamedListing", "WriteTransaction", "EmbedRequest", ExtractSummary, SkipCallback], None]


class StreamedListing(Sequence[Path]):
    """The images below a local folder as the Ray engine lists them: ``units`` to
    list on the workers (see :func:`~.ray_tasks.listing_units`), nothing listed here.
    A new store's run streams them (:meth:`stream_into`); anything that needs the
    list itself (a store with rows to compare, an int8 calibration sample) takes it
    in full, once, through ``list_all``."""

    def __init__(self, location: Path, units: list[dict[str, Any]], list_all: Callable[[], ImageList],
                 stream: StreamRun) -> None:
        self.location, self.units = location, units
        self._list_all, self._stream = list_all, stream
        self._files: ImageList | None = None
        self.streamed: int | None = None  # files a streamed run listed
        self.streamed_unreadable: list[tuple[str, str]] = []  # folders it could not list

    @property
    def materialised(self) -> bool:
        return self._files is not None

    def files(self) -> ImageList:
        if self._files is None:
            self._files = self._list_all()
        return self._files

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        return self._files.unreadable if self._files is not None else []

    @property
    def source(self) -> Any:
        return self.files().source

    def stream_into(self, txn: WriteTransaction, request: EmbedRequest, summary: ExtractSummary,
                    skip: SkipCallback) -> None:
        self._stream(self, txn, request, summary, skip)

    def __len__(self) -> int:
        return self.streamed if self.streamed is not None else len(self.files())

    def __iter__(self) -> Iterator[Path]:
        return iter(self.files())

    @overload
    def __getitem__(self, index: int) -> Path: ...
    @overload
    def __getitem__(self, index: slice) -> list[Path]: ...

    def __getitem__(self, index: int | slice) -> Path | list[Path]:
        return self.files()[index]

    def __eq__(self, other: object) -> bool:
        return list(self.files()) == other

    __hash__ = None  # type: ignore[assignment]


class StampWriter:
    """The stat cache of a streamed run, written entry by entry into a temporary
    file beside ``stat-cache.json`` (the driver keeps none of it), which
    :meth:`finish` moves into place: the format :class:`~.statcache.StatCache` reads."""

    def __init__(self, root: Path) -> None:
        self.path = root / STAT_CACHE
        self._temp = root / f".{STAT_CACHE}.{os.getpid()}.tmp"
        self._fh: Any = None
        self._count = 0

    def add(self, path: str, size: int, mtime_ns: int, etag: str, sha256: str) -> None:
        try:
            if self._fh is None:
                self._fh = open(self._temp, "w", encoding="ascii")
                self._fh.write(f'{{"format":{FORMAT},"entries":{{')
            sep = "," if self._count else ""
            self._fh.write(f"{sep}{json.dumps(path)}:{json.dumps([size, mtime_ns, etag, sha256])}")
            self._count += 1
        except OSError:
            self.discard()  # only a cache: the next run hashes again

    def finish(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write("}}")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._temp, self.path)
        except OSError:
            self.discard()
        self._fh = None

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._temp.unlink(missing_ok=True)


class StreamedRows:
    """The driver's side of a streamed run, batch by batch: each failed file is
    skipped (and remembered by content, as the local engine does), each folder that
    could not be listed noted, each hashed file's stamp written to the stat cache."""

    def __init__(self, listing: StreamedListing, txn: WriteTransaction, skip: SkipCallback) -> None:
        self.listing, self.txn, self.skip = listing, txn, skip
        self.stamps = StampWriter(txn.root)
        self.listed = 0

    def __call__(self, out: dict[str, np.ndarray]) -> None:
        for k in range(len(out["reason"])):
            path, reason = os.fsdecode(out["path"][k]), str(out["reason"][k])
            if out["kind"][k] == FOLDER_ROW:
                self.listing.streamed_unreadable.append((path, reason))
                continue
            self.listed += 1
            sha = str(out["sha256"][k])
            if reason:
                if sha:  # remembered, so an unchanged bad file is not decoded again
                    self.txn.record_skipped(path, sha, reason)
                self.skip(path, reason)
            if sha and out["cacheable"][k]:
                self.stamps.add(path, int(out["size"][k]), int(out["mtime_ns"][k]), str(out["etag"][k]), sha)


def stream_new_store(embed_stream: Callable[[WriteTransaction, EmbedRequest, Callable[..., None]], int],
                     listing: StreamedListing, txn: WriteTransaction, request: EmbedRequest,
                     summary: ExtractSummary, skip: SkipCallback) -> None:
    """Run ``embed_stream`` (the executor's streamed job) into ``txn``, handling its
    rows with :class:`StreamedRows`; fill in ``summary``. A tree with no image at all
    is the listing's error, as before (only known once it has been listed)."""
    rows = StreamedRows(listing, txn, skip)
    try:
        summary.embedded += embed_stream(txn, request, rows)
    except BaseException:
        rows.stamps.discard()
        raise
    listing.streamed = rows.listed
    error = listing_error(listing.location, [None] * rows.listed, listing.streamed_unreadable)
    if error is not None:
        rows.stamps.discard()
        raise error
    summary.added = summary.embedded
    if summary.embedded:
        rows.stamps.finish()
    else:
        rows.stamps.discard()


def raise_fatal(out: dict[str, np.ndarray]) -> None:
    if len(out["fatal"]) and out["fatal"][0]:
        raise CbirError(str(out["fatal"][0]), str(out["remedy"][0]) or None)
