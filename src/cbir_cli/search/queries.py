"""One ``cbir query`` run: image files, indexed images by id or by path, an optional
region of each, an optional filter -- answered in the order given, each with what
it looked like (for ``--report``/``--grid``). With words (``--text``/``--not``),
all of them make one combined query instead (:mod:`.word_queries`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.decode import load_image
from ..paths import display_path
from .gallery import QueryView

if TYPE_CHECKING:
    from ..imageio.region import Box
    from .filters import ResultFilter
    from .searcher import Hit, Searcher


@dataclass
class QueryRequest:
    """``images``: files to embed; ``ids`` / ``paths``: indexed images, whose stored
    vectors are the queries (no model needed) unless a ``box`` asks for a region."""

    images: Sequence[str | os.PathLike[str]] = ()
    ids: Sequence[int] = ()
    paths: Sequence[str | os.PathLike[str]] = ()
    box: Box | None = None
    result_filter: ResultFilter | None = None
    texts: Sequence[str] = ()  # words to search for (--text)
    negatives: Sequence[str] = ()  # words to steer away from (--not)

    @property
    def has_words(self) -> bool:
        return bool(self.texts or self.negatives)

    def check(self) -> None:
        if not (self.images or self.ids or self.paths or self.texts):
            raise CbirError("nothing to search with: give query images, indexed image ids, indexed paths or "
                            "words (--text)")
        if self.has_words and self.box is not None:
            raise CbirError("--box cannot be combined with --text/--not: search by words with whole images")


@dataclass
class Answer:
    view: QueryView
    hits: list[Hit]
    id: int | None = None  # the indexed image queried, if any
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"query": self.view.label}
        if self.id is not None:
            out["id"] = self.id
        return {**out, **self.extra, "results": [h.as_dict() for h in self.hits]}


def answer_queries(searcher: Searcher, request: QueryRequest, k: int) -> list[Answer]:
    """Every query of ``request``: image files first, then ids, then indexed paths."""
    request.check()
    answers: list[Answer] = []
    files = [str(p) for p in request.images]
    indexed = [(int(i), f"id {int(i)}") for i in request.ids]
    indexed += [(searcher.id_of_path(p), display_path(p)) for p in request.paths]
    if request.has_words:
        return [_word_answer(searcher, request, files, indexed, k)]
    if request.box is None:
        # Only image files need the model; indexed images are their stored vectors.
        if files:
            for path, hits in zip(files, searcher.search_paths(files, k, result_filter=request.result_filter)):
                answers.append(Answer(QueryView(display_path(path), path=path), hits))
        if indexed:
            found = searcher.search_ids([i for i, _ in indexed], k, result_filter=request.result_filter)
            for (image_id, label), hits in zip(indexed, found):
                answers.append(Answer(QueryView(label, path=searcher.row(image_id).path), hits, image_id))
        return answers
    # A region: cut it from the full-size picture, search with it, show it.
    sources = [(path, display_path(path), None) for path in files]
    sources += [(searcher.row(image_id).path, label, image_id) for image_id, label in indexed]
    regions = [request.box.crop(load_image(path)) for path, _, _ in sources]
    for (_, label, image_id), region, hits in zip(sources, regions,
                                                  searcher.search_images(regions, k,
                                                                         result_filter=request.result_filter)):
        answers.append(Answer(QueryView(f"{label} [{request.box.text}]", image=region), hits, image_id,
                              {"box": request.box.text}))
    return answers


def _word_answer(searcher: Searcher, request: QueryRequest, files: list[str], indexed: list[tuple[int, str]],
                 k: int) -> Answer:
    from .word_queries import load_query_images, search_words, word_query_label

    hits = search_words(searcher, request.texts, request.negatives, k, request.result_filter,
                        load_query_images(searcher, files), [i for i, _ in indexed])
    label = word_query_label(files, [label for _, label in indexed], request.texts, request.negatives)
    extra: dict[str, Any] = {"text": list(request.texts), "not": list(request.negatives)}
    if files:
        extra["images"] = [display_path(f) for f in files]
    if indexed:
        extra["ids"] = [i for i, _ in indexed]
    return Answer(QueryView(label, path=files[0] if len(files) == 1 and not indexed else None), hits, None, extra)
