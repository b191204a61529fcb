"""``cbir evaluate --report DIR``: a small static HTML report with PNG grids.

Written files::

    DIR/index.html          metrics table + one section per feature kind
    DIR/grid-<feature>.png  sample queries (rows): the query, then its top-K results,
                            relevant ones framed green, others red
    DIR/thumbs/*.jpg        one thumbnail per image shown (the HTML refers to them)

Composed with Pillow only (no plotting library). The sample queries are the same
for every feature kind -- the first image of classes spread evenly over the label
range -- so the grids can be compared row by row.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..imageio.thumbnails import ThumbnailFolder, Tile, compose_grid
from ..paths import display_path
from .provenance import describe_environment
from .results import RECALL_IS_TOP_K

if TYPE_CHECKING:
    from .results import Evaluation, FeatureResult

# Rows of the settings table: (key of provenance.column_settings, label).
SETTING_ROWS = (("model", "model"), ("weights", "weights"), ("weights_file", "weights file"),
                ("precision", "precision"), ("runtime", "runtime"), ("device", "device"), ("dim", "dimensions"),
                ("descriptor", "descriptor"), ("rerank", "re-ranking (query time)"), ("dba", "DBA (index time)"))

THUMB = 112  # thumbnail box, px
QUERY_COLOUR = (40, 90, 200)
RELEVANT_COLOUR = (30, 160, 60)
IRRELEVANT_COLOUR = (200, 40, 40)


def sample_queries(result: FeatureResult, relevance: str, count: int) -> list[str]:
    """Paths of ``count`` queries: the first image of classes evenly spread over
    the sorted labels (deterministic, no randomness)."""
    import numpy as np

    from .run import relevance_labels

    labels = relevance_labels(result.collection, relevance)
    classes = np.unique(labels)
    picks = classes[np.unique(np.linspace(0, classes.size - 1, num=min(count, classes.size)).round().astype(int))]
    first = {int(c): int(np.argmax(labels == c)) for c in picks}
    return [result.collection.paths[first[int(c)]] for c in picks]


def query_rows(result: FeatureResult, relevance: str, queries: list[str],
               top_k: int) -> list[tuple[str, list[tuple[str, bool]]]]:
    """(query path, [(result path, relevant?), ...]) for each sample query present
    in this result's collection."""
    from .run import relevance_labels

    labels = relevance_labels(result.collection, relevance)
    position = {p: i for i, p in enumerate(result.collection.paths)}
    rows = []
    for query in queries:
        qi = position.get(query)
        if qi is None:
            continue
        hits = [int(j) for j in result.neighbours[qi, :top_k] if j >= 0]
        rows.append((query, [(result.collection.paths[j], bool(labels[j] == labels[qi])) for j in hits]))
    return rows


def grid_png(rows: list[tuple[str, list[tuple[str, bool]]]], top_k: int, thumbs: ThumbnailFolder,
             target: Path) -> None:
    """One row per query: the query (blue), then its results (green/red)."""
    tiles = [[Tile(thumbs.get(query), QUERY_COLOUR)]
             + [Tile(thumbs.get(path), RELEVANT_COLOUR if relevant else IRRELEVANT_COLOUR) for path, relevant in hits]
             for query, hits in rows]
    compose_grid(tiles, THUMB, columns=top_k + 1).save(target)


_STYLE = """
body { font-family: sans-serif; margin: 2em; }
table.metrics { border-collapse: collapse; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.metrics td:first-child { text-align: left; }
.grid img { width: 96px; height: 96px; object-fit: contain; border: 4px solid; margin: 2px; }
.q { border-color: rgb(40,90,200) !important; }
.rel { border-color: rgb(30,160,60) !important; }
.irr { border-color: rgb(200,40,40) !important; }
"""


def _img_tag(thumbs: ThumbnailFolder, path: str, css: str) -> str:
    name = html.escape(display_path(path))
    return f'<img class="{css}" src="thumbs/{thumbs.name(path)}" title="{name}" alt="{name}">'


def _setting(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def settings_table(evaluation: Evaluation) -> str:
    """What made the figures: each column's model, weights, precision, runtime,
    descriptor and re-ranking, and the tool and library versions."""
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in evaluation.results)
    rows = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{html.escape(_setting(r.settings.get(key)))}</td>"
                                          for r in evaluation.results) + "</tr>"
        for key, label in SETTING_ROWS if any(key in r.settings for r in evaluation.results))
    return (f"<h2>Settings</h2><table class='metrics settings'><tr><th>setting</th>{head}</tr>{rows}</table>"
            f"<p>versions: {html.escape(describe_environment(evaluation.environment))}</p>")


def write_report(evaluation: Evaluation, out_dir: str | os.PathLike[str], queries: int = 8,
                 top_k: int = 5) -> Path:
    """Write the report into ``out_dir`` (created); returns the path of index.html."""
    if queries < 1 or top_k < 1:
        raise CbirError("the report needs at least 1 query and 1 result per query")
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CbirError(f"{display_path(out)}: cannot create the report folder ({exc.strerror or exc})") from None
    thumbs = ThumbnailFolder(out, THUMB)
    sample = sample_queries(evaluation.results[0], evaluation.relevance, queries)
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in evaluation.results)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for label, cells in evaluation.table_rows()
    )
    notes = [RECALL_IS_TOP_K, *sorted({n for r in evaluation.results for n in r.metrics["notes"]})]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cbir evaluate</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>cbir evaluate</h1><p>{html.escape(evaluation.dataset)}<br>",
        f"relevant: <b>{html.escape(evaluation.relevance_label)}</b><br>",
        f"{html.escape(evaluation.interval_label)}<br>",
        f"total {evaluation.seconds:.1f} s, peak RSS {evaluation.peak_rss_mb:.0f} MB "
        f"(largest worker {evaluation.peak_rss_children_mb:.0f} MB)</p>",
        f"<table class='metrics'><tr><th>metric</th>{head}</tr>{body}</table>",
        "".join(f"<p><i>note: {html.escape(n)}</i></p>" for n in notes),
        settings_table(evaluation),
        f"<p>Sample queries (blue) and their top {top_k} results: "
        "<span style='color:rgb(30,160,60)'>relevant</span>, "
        "<span style='color:rgb(200,40,40)'>not relevant</span>.</p>",
    ]
    for result in evaluation.results:
        rows = query_rows(result, evaluation.relevance, sample, top_k)
        png = f"grid-{result.feature}.png"
        grid_png(rows, top_k, thumbs, out / png)
        lines = "".join(
            "<div>" + _img_tag(thumbs, q, "q")
            + "".join(_img_tag(thumbs, p, "rel" if rel else "irr") for p, rel in hits) + "</div>"
            for q, hits in rows
        )
        parts.append(f"<h2>{html.escape(result.label)}</h2><div class='grid'>{lines}</div>"
                     f"<p>As one image: <a href='{png}'>{png}</a></p>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("".join(parts), encoding="utf-8")
    return index
