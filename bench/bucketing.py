#!/usr/bin/env python3
"""Does rounding full-image sizes (so that images batch together) change retrieval?

    python bench/bucketing.py --root ../shared/datasets/oxford17flowers
    python bench/bucketing.py --root ../shared/datasets/oxford17flowers --steps 1,32 --limit 400

Full-image inputs keep each image's aspect ratio, so their sizes differ; padding a
batch to one size changes the descriptors, so the product rounds the long side to a
multiple of the network stride (32) instead, and images of one rounded size share a
batch. This script embeds a labelled folder with the default descriptor once per
rounding step (1 = no rounding: every image its own size), side by side on the same
decoded images, and prints all-vs-all R@1 / mAP / MAP@R, how many distinct input
shapes there are (fewer = bigger batches), and the model's images per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import REPO, write_result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "oxford17flowers")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--steps", default="1,16,32", help="long-side rounding steps to compare (1 = none)")
    p.add_argument("--limit", type=int, default=None, help="whole classes up to N images (quick runs)")
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args()


def main() -> None:
    import numpy as np

    from cbir_cli.evaluate.datasets import load_folder
    from cbir_cli.evaluate.run import EvaluationOptions, rank_all_vs_all, score_rankings
    from cbir_cli.imageio.decode import load_image
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.preprocess import full_image_pixels

    args = parse_args()
    collection = load_folder(args.root, limit=args.limit)
    embedder = load_embedder(args.model, device="cpu", runtime=args.runtime)
    config = embedder.config
    shorts = [config.scaled(config.input_size * s) for s in config.descriptor.scales]
    steps = [int(s) for s in args.steps.split(",")]
    print(f"{collection.describe()}; {args.model} ({config.descriptor.label()}, short sides "
          f"{'+'.join(map(str, shorts))}), runtime {type(embedder).__name__}")
    vectors = {step: [] for step in steps}
    shapes: dict[int, set] = {step: set() for step in steps}
    seconds = dict.fromkeys(steps, 0.0)
    for start in range(0, len(collection), args.batch_size):
        images = [load_image(p, draft_size=config.draft_size) for p in collection.paths[start:start + args.batch_size]]
        for step in steps:
            batch = [tuple(full_image_pixels(img, short, config, step) for short in shorts) for img in images]
            shapes[step].update(a.shape for item in batch for a in item)
            began = time.perf_counter()
            vectors[step].append(embedder.embed(batch))
            seconds[step] += time.perf_counter() - began
    options = EvaluationOptions()
    table = []
    print("| long side rounded to | distinct input shapes | model img/s | R@1 | mAP | MAP@R |")
    print("|---|---|---|---|---|---|")
    for step in steps:
        matrix = np.concatenate(vectors[step])
        metrics = score_rankings(collection.labels, rank_all_vs_all(matrix, len(collection) - 1), options)
        print(f"| {step} px | {len(shapes[step])} | {len(collection) / seconds[step]:.1f} | "
              f"{metrics['recall@1']:.4f} | {metrics['map']:.4f} | {metrics['map@r']:.4f} |")
        table.append({"long side rounded to": f"{step} px", "distinct input shapes": len(shapes[step]),
                      "model img/s": round(len(collection) / seconds[step], 1), "R@1": f"{metrics['recall@1']:.4f}",
                      "mAP": f"{metrics['map']:.4f}", "MAP@R": f"{metrics['map@r']:.4f}"})
    print(f"written {write_result('bucketing', {'table': table}, extra={'dataset': collection.describe()})}")


if __name__ == "__main__":
    main()
