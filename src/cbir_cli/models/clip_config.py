"""What a CLIP model is (:class:`ClipConfig`) and the fingerprint its vectors
carry: shared by the family (:mod:`.clip_family`, no heavy imports) and the
runtime (:mod:`.clip_embedder`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .protocol import model_fingerprint_of
from .registry import ModelConfig

FAMILY = "clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipConfig(ModelConfig):
    """A CLIP model: open_clip's architecture and pretrained tag (None: ``--weights`` only)."""

    arch: str = ""
    pretrained: str | None = None


def clip_fingerprint(config: ClipConfig, weights_id: str) -> dict[str, Any]:
    """The family and pretrained tag recorded beside the usual keys."""
    return {**model_fingerprint_of(config, weights_id, family=FAMILY), "pretrained": config.pretrained}
