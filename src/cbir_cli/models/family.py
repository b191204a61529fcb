"""The model-family seam: a family names its models and builds their Embedders.

A model name is ``family:model`` (``fake:tiny``, ``clip:ViT-B-32/laion2b_s34b_b79k``);
a bare name (``resnet50``) is one of the built-in CNN family (:mod:`.cnn_family`),
which is what every store made before families existed records. Families are
registered in the ``cbir_cli.models`` entry-point group (:mod:`cbir_cli.plugins`),
the built-in one the same way; the registered object implements
:class:`ModelFamily`.

A family's configs subclass :class:`~.registry.ModelConfig` (name, dim, input
pixels, ``has_text``); its embedders implement :class:`~.protocol.Embedder`, and
:class:`~.protocol.TextEmbedder` too where the model has a text tower. The
fingerprint an embedder records names the model by its full name (what
:func:`~.loading.load_embedder` is given back), so a store finds its family again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..plugins import Registry

if TYPE_CHECKING:
    from .protocol import Embedder
    from .quantize import Calibration
    from .registry import DescriptorSettings, ModelConfig

# The family of a name without ``family:``.
DEFAULT_FAMILY = "cnn"

Weights = str | os.PathLike[str] | None


@runtime_checkable
class ModelFamily(Protocol):
    """A kind of model (CNNs, CLIP, a plugin's): it lists its models and builds an
    :class:`~cbir_cli.models.protocol.Embedder` from a model's name. Register one
    under the ``cbir_cli.models`` entry-point group; its models are then named
    ``FAMILY:MODEL`` (see Extending)."""

    #: The family's name, the part before ``:`` in its models' names.
    name: str
    #: One line for ``cbir models``.
    description: str

    def model_names(self) -> Sequence[str]:
        """The models it offers (names within the family; ``cbir models`` lists them)."""
        ...

    def config(self, model: str) -> ModelConfig:
        """``model``'s config.

        Args:
            model: the name within the family (after ``FAMILY:``).

        Returns:
            Its name, dim, input size and description (what ``cbir models`` shows).

        Raises:
            CbirError: an unknown model, naming the choices.
        """
        ...

    def weights_status(self, model: str) -> str:
        """How its weights stand here, in a word: installed, missing, built-in, download..."""
        ...

    def load(self, model: str, weights: Weights, device: str, runtime: str,
             descriptor: DescriptorSettings | None, calibration: Calibration | None) -> Embedder:
        """An embedder of ``model`` on ``device`` (``auto``/``cpu``/``cuda``) with
        ``runtime`` (``auto``/``torch``/``onnx``; a family may have one only).
        ``descriptor``: how a CNN pools its feature map (None: the model's default),
        ignored by a family without one (the CLI refuses descriptor options for its
        models). ``calibration``: int8 (None: fp32); a family without an int8 path
        refuses it with a CbirError.

        Args:
            model: the name within the family.
            weights: a weights file, or None for the family's own.
            device: ``auto``, ``cpu`` or ``cuda``.
            runtime: ``auto``, ``torch`` or ``onnx``.
            descriptor: pooling settings, or None.
            calibration: int8 calibration images, or None.

        Returns:
            The embedder.

        Raises:
            CbirError: anything it cannot do here, in one line.
        """
        ...

    def fingerprint(self, model: str, weights: Weights, descriptor: DescriptorSettings | None,
                    calibration: Calibration | None) -> dict[str, Any]:
        """What :meth:`load`'s embedder would record, without building it.

        Args:
            model: the name within the family.
            weights: a weights file, or None.
            descriptor: pooling settings, or None.
            calibration: int8 calibration, or None.

        Returns:
            The fingerprint (JSON-serialisable; stored in the index's manifest).
        """
        ...

    def fingerprint_problems(self, fingerprint: dict[str, Any], weights_path: str | None, where: Any) -> list[str]:
        """Why this family could no longer make the vectors ``fingerprint`` records.

        Args:
            fingerprint: an index's recorded fingerprint.
            weights_path: the weights file it names, if any.
            where: what to name in each line (the index folder).

        Returns:
            One line per problem; empty when the family can make those vectors.
        """
        ...


MODEL_FAMILIES: Registry[ModelFamily] = Registry(
    "cbir_cli.models", "model family", {DEFAULT_FAMILY: "cbir_cli.models.cnn_family:CNN_FAMILY",
                                        "clip": "cbir_cli.models.clip_family:CLIP_FAMILY"})


def split_model_name(name: str) -> tuple[str, str]:
    """``"fake:tiny"`` -> ("fake", "tiny"); ``"resnet50"`` -> ("cnn", "resnet50")."""
    family, sep, model = name.partition(":")
    return (family, model) if sep else (DEFAULT_FAMILY, name)


def family_of(name: str) -> tuple[ModelFamily, str]:
    """The family of a full model name, and the name within it."""
    family, model = split_model_name(name)
    return MODEL_FAMILIES.get(family), model


def model_config(name: str) -> ModelConfig:
    """The config of any registered model, by its full name."""
    family, model = family_of(name)
    return family.config(model)


def full_name(family: str, model: str) -> str:
    return model if family == DEFAULT_FAMILY else f"{family}:{model}"


def list_models() -> list[ModelConfig]:
    """Every model of every family.

    Returns:
        The models' configs, the built-in families' first (``cbir models`` shows them).
    """
    return [config for _, config, _ in model_table()]


def model_table() -> list[tuple[str, ModelConfig, str]]:
    """(family, config, weights status) for every model of every family."""
    rows = []
    for family_name in MODEL_FAMILIES.names():
        family = MODEL_FAMILIES.get(family_name)
        rows.extend((family_name, family.config(m), family.weights_status(m)) for m in family.model_names())
    return rows


def vector_problems(fp: dict[str, Any], config: ModelConfig, weights_path: str | None, where: Any,
                    weights_id: Callable[[str], str]) -> list[str]:
    """Why ``config`` with the weights at ``weights_path`` (``weights_id``: their
    identity) no longer makes the vectors ``fp`` records: dimension, preprocessing,
    weights; what every family's :meth:`ModelFamily.fingerprint_problems` checks."""
    from ..errors import CbirError

    problems = []
    if fp.get("dim") != config.dim:
        problems.append(f"{where}: model {config.name} makes {config.dim}-d vectors, manifest says {fp.get('dim')}")
    if fp.get("preprocessing") != config.preprocessing():
        problems.append(f"{where}: model {config.name}'s preprocessing changed since these vectors were made")
    if weights_path:
        try:
            if weights_id(weights_path) != fp.get("weights"):
                problems.append(f"{weights_path}: weights file changed since the index was built")
        except CbirError as exc:
            problems.append(str(exc))
    return problems


def text_models() -> list[str]:
    """The models that also embed words (for the message of a text query on another model)."""
    return [config.name for _, config, _ in model_table() if config.has_text]
