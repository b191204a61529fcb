"""``cbir query --verify``: each answer's first candidates checked with local
features and geometry (:mod:`.verify`); those verified as the same picture as
the query (a copy of it, mirrored or not, or its original) move first, in the
search's order, and are listed under ``verified`` in the answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .verify import CANDIDATES, NOT_VERIFIED, verified_first, verify

if TYPE_CHECKING:
    from .queries import Answer


def verify_answers(answers: Sequence[Answer], k: int, candidates: int = CANDIDATES) -> None:
    """Reorder each answer's hits (searched ``max(k, candidates)`` deep) by
    verification, keep ``k``, and record the verified ids (in place)."""
    from ..imageio.decode import load_image
    from ..imageio.local_features import extract, extract_file

    for answer in answers:
        head = answer.hits[:candidates]
        view = answer.view
        if not head or (view.image is None and view.path is None):
            answer.hits = answer.hits[:k]
            continue
        mine = extract(view.image if view.image is not None else load_image(view.path))
        checks = []
        for hit in head:
            theirs = extract_file(hit.path)
            checks.append(verify(mine, theirs) if theirs is not None else NOT_VERIFIED)
        order = verified_first(list(range(len(head))), checks)
        hits = [head[i] for i in order] + answer.hits[candidates:]
        answer.hits = [dataclasses.replace(h, rank=r) for r, h in enumerate(hits[:k], start=1)]
        answer.extra["verified"] = [head[i].id for i in order if checks[i].same_picture]
