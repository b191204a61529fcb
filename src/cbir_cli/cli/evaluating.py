"""``cbir evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..evaluate.datasets import DATASET_KINDS
from .common import (
    PRODUCT_RELEVANCE,
    JsonOpt,
    Relevance,
    WeightsOpt,
    _choices,
    cli_errors,
    command,
    show_progress,
    stderr,
    stdout,
)
from .option_groups import DbaOptions, DescriptorOptions, EmbedOptions, EvaluationRerankOptions, grouped

COPIES = "copies"
EvaluateDataset = _choices("EvaluateDataset", (*DATASET_KINDS, COPIES))


@command("evaluate")
@grouped
def evaluate_cmd(
    dataset: Annotated[EvaluateDataset, typer.Option("--dataset", help="sop (Stanford Online Products: Ebay_test.txt, "
                                                     "Ebay_train.txt), folder "
                                                     "(one sub-folder per class), or copies (copy detection on any "
                                                     "folder of images: distorted copies of seeded images query "
                                                     "it).")],
    root: Annotated[Path, typer.Option("--root", help="Dataset folder.")],
    split: Annotated[Optional[str], typer.Option("--split", help="sop: test (default), train or all; folder: all.",
                                                 show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most N images, whole classes in a fixed "
                                                 "seeded order (quick runs).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model for --features deep. Default: "
                                                 "resnet50, else installed mobilenet_v2.", show_default=False)] = None,
    weights: WeightsOpt = None,
    *,
    descriptor: DescriptorOptions,
    rerank: EvaluationRerankOptions,
    dba: DbaOptions,
    compare: Annotated[bool, typer.Option("--compare", help="Evaluate every descriptor / re-ranking variant of "
                                          "the deep model side by side (one row each).")] = False,
    features: Annotated[str, typer.Option("--features", help="deep, hsv, hog, sift_bovw, a comma list, or all "
                                          "(side by side).")] = "deep",
    relevance: Annotated[Relevance, typer.Option("--relevance", help="sop: product (same class_id) or superclass "
                                                 "(same super_class_id) counts as relevant.")] = PRODUCT_RELEVANCE,
    k: Annotated[int, typer.Option("-k", min=1, help="K of P@K and IR-Recall@K; R@K (= Top-K accuracy) is "
                                   "shown for it too.")] = 5,
    recall_at: Annotated[str, typer.Option("--recall-at", help="Recall@K values (SOP convention: a relevant "
                                           "image in the top K, i.e. Top-K accuracy).")] = "1,10,100,1000",
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Resamples of the queries for the 95% "
                                           "intervals of every metric (seed 0; 0: no intervals).")] = 1000,
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, help="Results ranked per query. Default: the "
                                                 "whole gallery up to 5000 images, else max(K).",
                                                 show_default=False)] = None,
    features_dir: Annotated[Optional[Path], typer.Option("--features-dir", help="Feature cache folder (one store "
                                                         "per feature kind). Default: the user cache dir, per "
                                                         "dataset.", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write an HTML/PNG report into this folder.",
                                                   show_default=False)] = None,
    report_queries: Annotated[int, typer.Option("--report-queries", min=1, help="Sample queries in the report.")] = 8,
    copies: Annotated[int, typer.Option("--copies", min=1, help="copies: how many seeded images get distorted "
                                        "(each gets every distortion).")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="copies: seed of the choice of images and of the "
                                      "distortions' random parts.")] = 0,
    distortions: Annotated[Optional[str], typer.Option("--distortions", help="copies: a comma list of "
                                                       "distortions (default: all).", show_default=False)] = None,
    text_queries: Annotated[bool, typer.Option("--text-queries", help="folder: each class folder's name, in "
                                               "--prompt, queries all images by words (a model with a text "
                                               "tower, clip:...); mAP and R@K per class and overall.")] = False,
    prompt: Annotated[str, typer.Option("--prompt", metavar="TEMPLATE",
                                        help="Template of --text-queries: its empty pair of braces is the class "
                                             "name (underscores read as spaces). Default: 'a photo of a' and the "
                                             "name.", show_default=False)] = "a photo of a {}",
    embed: EmbedOptions,
    as_json: JsonOpt = False,
) -> None:
    """Score retrieval on a labelled dataset, or copy detection on any folder of images.

    Every image of a labelled dataset queries all the others; with copies, distorted copies of seeded
    images query the collection."""
    with cli_errors():
        from ..evaluate.datasets import load_collection
        from ..evaluate.intervals import Bootstrap
        from ..evaluate.provenance import describe_environment, describe_settings
        from ..evaluate.results import RECALL_IS_TOP_K
        from ..evaluate.run import EvaluationOptions, evaluate, parse_features, parse_ks

        options = EvaluationOptions(
            features=parse_features(features), model=model, weights=weights, relevance=relevance.value,
            descriptor=descriptor.settings(), rerank=rerank.settings(), rerank_baselines=rerank.baselines,
            bootstrap=Bootstrap(bootstrap), compare=compare,
            recall_ks=parse_ks(recall_at, "--recall-at"), k=k, depth=depth, features_dir=features_dir,
            extract=embed.extract_options(show_progress(as_json)),
        )
        dba_settings = dba.settings()
        if dba_settings is not None:
            options.dba = dba_settings
        if dataset.value == COPIES:
            _evaluate_copies(root, options, copies, seed, distortions, report, as_json)
            return
        collection = load_collection(dataset.value, root, split, limit)
        err = stderr()
        err.print(f"evaluating {collection.describe()}")
        if text_queries:
            _evaluate_text_queries(collection, options, prompt, as_json)
            return
        result = evaluate(collection, options, on_notice=err.print)
        report_path = None
        if report is not None:
            from ..evaluate.report import write_report

            report_path = write_report(result, report, queries=report_queries, top_k=k)
        if as_json:
            payload = result.as_dict()
            payload["report"] = str(report_path) if report_path else None
            typer.echo(json.dumps(payload, indent=2, allow_nan=False))
            return

        out = stdout()
        out.print(results_table(result, f"{result.dataset}\nrelevant: {result.relevance_label}\n"
                                f"{result.interval_label}", "metric", compare))
        for note in [RECALL_IS_TOP_K, *sorted({n for r in result.results for n in r.metrics["notes"]})]:
            out.print(f"note: {note}")
        out.print(f"versions: {describe_environment(result.environment)}")
        settings = {r.label: describe_settings(r.settings) for r in result.results}
        if len(set(settings.values())) == 1:  # e.g. --compare: one model, several rankings
            settings = {"settings": next(iter(settings.values()))}
        for label, text in settings.items():
            out.print(f"{label}: {text}")
        out.print(f"total {result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB "
                  f"(largest worker {result.peak_rss_children_mb:.0f} MB)")
        if report_path:
            out.print(f"report: {report_path}")


def _evaluate_text_queries(collection, options, prompt: str, as_json: bool) -> None:
    from rich.table import Table

    from ..evaluate.text_queries import evaluate_text_queries

    result = evaluate_text_queries(collection, options, prompt, on_notice=stderr().print)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2, allow_nan=False))
        return
    table = Table(title=f"{result.dataset}\ntext queries ({result.model}): {prompt!r} per class folder",
                  title_justify="left")
    for name in ("class", "images", "AP", *(f"R@{k}" for k in result.ks)):
        table.add_column(name, justify="left" if name == "class" else "right")
    for row in result.classes:
        table.add_row(row["class"], str(row["images"]), f"{row['ap']:.4f}",
                      *(f"{row[f'recall@{k}']:.0f}" for k in result.ks))
    table.add_row("overall (mean)", "", f"{result.overall['map']:.4f}",
                  *(f"{result.overall[f'recall@{k}']:.4f}" for k in result.ks))
    out = stdout()
    out.print(table)
    for note in result.notes:
        out.print(f"note: {note}")


def _evaluate_copies(root: Path, options, count: int, seed: int, distortions: str | None,
                     report: Path | None, as_json: bool) -> None:
    from ..errors import CbirError
    from ..evaluate.copies import DISTORTIONS
    from ..evaluate.copy_detection import CopyProtocol, evaluate_copies

    if report is not None:
        raise CbirError("the HTML report covers labelled datasets (sop, folder); copy detection prints its table")
    kinds = tuple(t.strip() for t in distortions.split(",") if t.strip()) if distortions else DISTORTIONS
    err = stderr()
    result = evaluate_copies(root, options, CopyProtocol(count, seed, kinds), on_notice=err.print)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    title = (f"{result.dataset}\ntop-1: the original ranked first; mAP: mean 1/rank" if options.compare else
             f"{result.dataset}\nper distortion: top-1 / mAP (the original ranked first / mean 1/rank)")
    out = stdout()
    out.print(results_table(result, title, "distortion", options.compare))
    for note in result.notes:
        out.print(f"note: {note}")
    out.print(f"total {result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB")


def results_table(result, title: str, first_column: str, compare: bool):
    """The results as a table (one column per result, or with ``compare`` one row per
    result), followed by each result's descriptor and re-ranking in words."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    if compare:
        header, rows = result.compare_rows()
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
    else:
        table.add_column(first_column)
        for r in result.results:
            table.add_column(r.label, justify="right")
        for label, cells in result.table_rows():
            table.add_row(label, *cells)
    return Group(table, *(Text(f"{r.label}: {r.ranking}") for r in result.results))
