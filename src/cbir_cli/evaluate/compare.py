"""What one evaluation column is -- a feature, and for deep features a descriptor --
and how its rankings are made (plain search, or re-ranked); and the fixed list of
descriptor / re-ranking variants ``cbir evaluate --compare`` shows side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..models.registry import DEFAULT_DESCRIPTOR, LEGACY_DESCRIPTOR, DescriptorSettings
from ..search.dba import DbaSettings
from ..search.rerank import NO_RERANKING, RerankSettings

if TYPE_CHECKING:
    import numpy as np

    from ..search.protocol import SearchBackend

NO_DBA = DbaSettings(depth=0)


@dataclass(frozen=True)
class Variant:
    """One column: ``feature`` (deep, hsv...), the deep model's ``descriptor`` (None:
    the model's default), and the re-ranking (query time) with its DBA (index time)."""

    feature: str = "deep"
    descriptor: DescriptorSettings | None = None
    rerank: RerankSettings = field(default_factory=RerankSettings)
    dba: DbaSettings = field(default_factory=DbaSettings)
    name: str | None = None  # label in comparisons

    @property
    def reranked(self) -> bool:
        return bool(self.rerank.qe_depth or self.rerank.pin_first or (self.rerank.use_dba and self.dba.enabled))

    def describe(self, model_descriptor: DescriptorSettings | None = None) -> str:
        """E.g. ``GeM p=3, full image, scales 1+1.4; re-ranked: DBA n=3 a=3, ...``."""
        parts = []
        descriptor = self.descriptor or model_descriptor
        if self.feature == "deep" and descriptor is not None:
            parts.append(descriptor.label())
        rerank = self.rerank.label(self.dba if self.rerank.use_dba else None)
        parts.append("no re-ranking" if rerank == "none" else f"re-ranked: {rerank}")
        return "; ".join(parts)


def model_descriptor(model: str | None, weights: Any = None) -> DescriptorSettings | None:
    """The descriptor a deep model uses when none is asked for (its registry default)."""
    from ..errors import CbirError
    from ..models.family import model_config
    from ..resolve import resolve_model

    try:
        return getattr(model_config(resolve_model(model, weights).name), "descriptor", None)
    except CbirError:
        return None


def ranking_backend(variant: Variant, inner: SearchBackend | None = None) -> SearchBackend:
    """An empty backend that ranks as ``variant`` says: ``inner`` (default: exact
    Faiss), wrapped in a :class:`~cbir_cli.search.rerank.RerankingBackend` when the
    variant re-ranks."""
    from ..search.faiss_backend import FaissBackend
    from ..search.rerank import RerankingBackend

    inner = inner if inner is not None else FaissBackend()
    if not variant.reranked:
        return inner
    return RerankingBackend(inner, variant.rerank, variant.dba if variant.rerank.use_dba else NO_DBA)


def rank(backend: SearchBackend, queries: np.ndarray, depth: int,
         exclude: np.ndarray | None = None) -> np.ndarray:
    """Ids (queries, depth), best first, -1 padded: re-ranked when ``backend`` re-ranks
    (``exclude``: one id per query kept out of its ranking and its expansion)."""
    from ..search.rerank import RerankingBackend

    if isinstance(backend, RerankingBackend):
        return backend.rank(queries, depth, exclude)[1]
    return backend.search(queries, depth)[1]


DBA_QE = RerankSettings()
QE_ONLY = RerankSettings(use_dba=False)
UNPINNED = RerankSettings(pin_first=False)
FULL_ONE_SCALE = DescriptorSettings(scales=(1.0,))
CROP_GEM = DescriptorSettings(input="crop", scales=(1.0,))


def compare_variants() -> list[Variant]:
    """The variants of ``--compare``: today's descriptor, each descriptor step towards
    the default, then each re-ranking step on the default (and on today's)."""
    return [
        Variant(descriptor=LEGACY_DESCRIPTOR, rerank=NO_RERANKING, dba=NO_DBA, name="crop, GAP (before)"),
        Variant(descriptor=CROP_GEM, rerank=NO_RERANKING, dba=NO_DBA, name="crop, GeM"),
        Variant(descriptor=FULL_ONE_SCALE, rerank=NO_RERANKING, dba=NO_DBA, name="full, GeM"),
        Variant(descriptor=DEFAULT_DESCRIPTOR, rerank=NO_RERANKING, dba=NO_DBA, name="full, GeM, 2 scales"),
        Variant(descriptor=DEFAULT_DESCRIPTOR, rerank=QE_ONLY, dba=NO_DBA, name="... + aQE + pin"),
        Variant(descriptor=DEFAULT_DESCRIPTOR, rerank=UNPINNED, name="... + DBA + aQE, no pin"),
        Variant(descriptor=DEFAULT_DESCRIPTOR, name="... + DBA + aQE + pin (default)"),
        Variant(descriptor=LEGACY_DESCRIPTOR, name="crop, GAP + DBA + aQE + pin"),
    ]
