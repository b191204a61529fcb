"""Looking instead of reading: query results and duplicate groups as a static HTML
page with thumbnails and scores, and as one PNG grid (``cbir query --report DIR``
or ``--grid PNG``, ``cbir dedup --report DIR``). Built on
:mod:`cbir_cli.imageio.thumbnails`, like ``cbir evaluate``'s report.

Files of a report folder::

    DIR/index.html     the page (thumbnails from thumbs/, links to the originals)
    DIR/results.png    (query) one row per query: the query, then its top K
    DIR/groups.png     (dedup) one row per group: the image kept, then the others
    DIR/thumbs/*.jpg
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..imageio.thumbnails import ThumbnailFolder, Tile, compose_grid
from ..paths import display_path

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .dedup import DedupResult, Member
    from .searcher import Hit

THUMB = 128
# A terminal preview: one row a terminal's width can hold.
PREVIEW_THUMB = 96
PREVIEW_HITS = 6
QUERY_COLOUR = (40, 90, 200)
HIT_COLOUR = (150, 150, 150)
KEEP_COLOUR = (30, 160, 60)
DUPLICATE_COLOUR = (200, 120, 30)
# A PNG grid of more rows than this would be too large to look at; the page says so.
MAX_GRID_ROWS = 60
MAX_GRID_COLUMNS = 12
# Groups shown on a dedup page (each costs a thumbnail per member); all of them
# are in the JSON/CSV output.
MAX_REPORT_GROUPS = 500


@dataclass(frozen=True)
class QueryView:
    """What a query looked like: its label, and its pixels (an upload, a region)
    or the file it was."""

    label: str
    image: PILImage.Image | None = None
    path: str | None = None

    def key(self) -> str:
        return self.path if self.image is None and self.path else f"query:{self.label}"


def _folder(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CbirError(f"{display_path(out)}: cannot create the report folder ({exc.strerror or exc})") from None
    return out


def _query_thumb(thumbs: ThumbnailFolder, query: QueryView) -> PILImage.Image | None:
    if query.image is not None:
        return thumbs.put(query.key(), query.image)
    return thumbs.get(query.path) if query.path else None


def _hit_tile(thumbs: ThumbnailFolder, hit: Hit) -> Tile:
    return Tile(thumbs.get(hit.path), HIT_COLOUR, f"#{hit.rank} {hit.score:.3f}")


def query_tiles(queries: Sequence[QueryView], results: Sequence[Sequence[Hit]],
                thumbs: ThumbnailFolder) -> list[list[Tile]]:
    return [[Tile(_query_thumb(thumbs, q), QUERY_COLOUR, "query")]
            + [_hit_tile(thumbs, h) for h in hits[:MAX_GRID_COLUMNS]]
            for q, hits in zip(queries[:MAX_GRID_ROWS], results)]


def query_preview(query: QueryView, hits: Sequence[Hit], count: int = PREVIEW_HITS) -> PILImage.Image:
    """One row for a terminal (``cbir query --preview``): the query where it is a
    picture (words have none), then its top ``count`` hits with rank and score."""
    thumbs = ThumbnailFolder(None, PREVIEW_THUMB)
    pictured = query.image is not None or query.path is not None
    tiles = [Tile(_query_thumb(thumbs, query), QUERY_COLOUR, "query")] if pictured else []
    return compose_grid([tiles + [_hit_tile(thumbs, h) for h in hits[:count]]], PREVIEW_THUMB)


def write_query_grid(target: str | os.PathLike[str], queries: Sequence[QueryView],
                     results: Sequence[Sequence[Hit]]) -> Path:
    """One PNG: a row per query, the query (blue) then its hits with rank and score."""
    path = Path(target).expanduser()
    _folder(path.parent)
    _save_png(compose_grid(query_tiles(queries, results, ThumbnailFolder(None, THUMB)), THUMB), path)
    return path


def _save_png(image: PILImage.Image, path: Path) -> None:
    try:
        image.save(path, format="PNG")
    except OSError as exc:
        raise CbirError(f"{display_path(path)}: cannot write the image ({exc.strerror or exc})") from None


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1d2330; }
.row { display: flex; flex-wrap: wrap; gap: 10px; margin: 0 0 1.4em; align-items: flex-start; }
figure { margin: 0; width: 170px; }
figure img { width: 140px; height: 140px; object-fit: contain; background: #eee; border: 4px solid #999; }
figure.query img { border-color: rgb(40,90,200); }
figure.keep img { border-color: rgb(30,160,60); }
figure.dup img { border-color: rgb(200,120,30); }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
.score { font-weight: 700; font-variant-numeric: tabular-nums; }
.muted { color: #6b7385; }
"""


def _page(title: str, body: list[str]) -> str:
    return "".join(["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
                    f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>", *body,
                    "</body></html>"])


def _figure(thumbs: ThumbnailFolder, key: str, css: str, caption: str, link: str | None = None) -> str:
    img = f"<img src='thumbs/{thumbs.name(key)}' alt='{html.escape(display_path(key))}'>"
    if link:
        img = f"<a href='{html.escape(Path(link).absolute().as_uri())}'>{img}</a>"
    return f"<figure class='{css}'>{img}<figcaption>{caption}</figcaption></figure>"


def _name(path: str) -> str:
    return f"<span title='{html.escape(display_path(path))}'>{html.escape(os.path.basename(display_path(path)))}</span>"


def write_query_report(out_dir: str | os.PathLike[str], queries: Sequence[QueryView],
                       results: Sequence[Sequence[Hit]], title: str = "cbir query") -> Path:
    """``index.html`` + ``results.png`` in ``out_dir``; returns the page's path."""
    out = _folder(out_dir)
    thumbs = ThumbnailFolder(out, THUMB)
    _save_png(compose_grid(query_tiles(queries, results, thumbs), THUMB), out / "results.png")
    body = []
    for query, hits in zip(queries, results):
        _query_thumb(thumbs, query)
        figures = [_figure(thumbs, query.key(), "query", f"query: {html.escape(query.label)}", query.path)]
        for hit in hits:
            thumbs.get(hit.path)
            figures.append(_figure(thumbs, hit.path, "hit", f"<span class='score'>#{hit.rank} {hit.score:.4f}</span>"
                                   f"<br>{_name(hit.path)}", hit.path))
        body.append(f"<div class='row'>{''.join(figures)}</div>")
    body.append("<p class='muted'>As one image: <a href='results.png'>results.png</a></p>")
    index = out / "index.html"
    index.write_text(_page(title, body), encoding="utf-8")
    return index


def _member_caption(member: Member, best: bool) -> str:
    size = f"{member.width}x{member.height}" if member.width else "unreadable"
    head = "keep" if best else f"<span class='score'>{member.score_to_best:.4f}</span>"
    return f"{head} · {size} · {member.bytes / 1024:,.0f} KiB<br>{_name(member.path)}"


def write_dedup_report(out_dir: str | os.PathLike[str], result: DedupResult,
                       max_groups: int = MAX_REPORT_GROUPS) -> Path:
    """``index.html`` + ``groups.png`` of the duplicate groups (the first
    ``max_groups``); returns the page's path."""
    out = _folder(out_dir)
    thumbs = ThumbnailFolder(out, THUMB)
    shown = result.groups[:max_groups]
    tiles = [[Tile(thumbs.get(m.path), KEEP_COLOUR if i == 0 else DUPLICATE_COLOUR,
                   "keep" if i == 0 else f"{m.score_to_best:.3f}") for i, m in enumerate(g.members[:MAX_GRID_COLUMNS])]
             for g in shown[:MAX_GRID_ROWS]]
    _save_png(compose_grid(tiles, THUMB), out / "groups.png")
    body = [f"<p>{len(result.groups)} groups of near-duplicates among {result.images} images at similarity "
            f"&ge; {result.threshold:g}: {result.duplicates} duplicates "
            f"({result.duplicate_bytes / 2**20:,.1f} MiB) besides the image kept in each group (green; the "
            "largest picture, then the largest file). Scores: cosine similarity with the image kept.</p>"]
    body += [f"<p class='muted'>note: {html.escape(n)}</p>" for n in result.notes]
    if len(shown) < len(result.groups):
        body.append(f"<p class='muted'>The first {len(shown)} groups are shown; the JSON and CSV outputs list all "
                    f"{len(result.groups)}.</p>")
    for number, group in enumerate(shown, start=1):
        figures = []
        for i, member in enumerate(group.members):
            thumbs.get(member.path)
            figures.append(_figure(thumbs, member.path, "keep" if i == 0 else "dup", _member_caption(member, i == 0),
                                   member.path))
        pairs = ", ".join(f"{a}&ndash;{b}: {s:.4f}" for a, b, s in group.links)
        body.append(f"<h3>group {number} ({len(group.members)} images)</h3><div class='row'>{''.join(figures)}</div>"
                    f"<p class='muted'>linked pairs (ids): {pairs}</p>")
    body.append("<p class='muted'>As one image: <a href='groups.png'>groups.png</a></p>")
    index = out / "index.html"
    index.write_text(_page("cbir dedup", body), encoding="utf-8")
    return index
