#!/usr/bin/env python3
"""What the default descriptor costs against the legacy one, side by side.

    python bench/descriptor_cost.py --root ../shared/datasets/oxford17flowers --limit 256

For each descriptor (legacy: centre crop 224, GAP; default: GeM over the full image
at short sides 224 and 320), interleaved and repeated (best of ``--repeat``):

* model only: the already preprocessed images through the embedder (img/s);
* preprocessing only: decode + resize in this process (img/s);
* pipeline: ``cbir index`` of the images into a fresh index (decoding workers, the
  model, shards, the Faiss index and the DBA vectors; img/s).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import REPO, write_result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "oxford17flowers")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    return p.parse_args()


def main() -> None:
    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.registry import DEFAULT_DESCRIPTOR, LEGACY_DESCRIPTOR
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder

    args = parse_args()
    files = list_images(args.root)
    step = max(1, len(files) // args.limit)
    picked = files[::step][:args.limit]
    scratch = Path(tempfile.mkdtemp(prefix="cbir-bench-descriptor-"))
    try:
        folder = scratch / "images"
        folder.mkdir()
        for i, path in enumerate(picked):
            (folder / f"{i:05d}{path.suffix}").symlink_to(path)
        descriptors = {"legacy (crop 224, GAP)": LEGACY_DESCRIPTOR, f"default ({DEFAULT_DESCRIPTOR.label()})":
                       DEFAULT_DESCRIPTOR}
        embedders = {name: load_embedder(args.model, device="cpu", runtime=args.runtime, descriptor=d)
                     for name, d in descriptors.items()}
        best: dict[str, dict[str, float]] = {name: {} for name in descriptors}
        for _ in range(args.repeat):
            for name, descriptor in descriptors.items():
                embedder = embedders[name]
                started = time.perf_counter()
                pixels = [embedder.preprocess(load_image(p, draft_size=embedder.config.draft_size)) for p in picked]
                prep = time.perf_counter() - started
                started = time.perf_counter()
                for start in range(0, len(pixels), 32):
                    embedder.embed(pixels[start:start + 32])
                model = time.perf_counter() - started
                target = scratch / "index"
                shutil.rmtree(target, ignore_errors=True)
                started = time.perf_counter()
                # fp32 like the model-only figures (int8 would change what the model costs).
                index_folder(folder, target, args.model, options=ExtractOptions(workers=args.workers, device="cpu",
                                                                                runtime=args.runtime,
                                                                                precision="fp32"),
                             descriptor=descriptor)
                pipeline = time.perf_counter() - started
                for key, seconds in (("preprocess", prep), ("model", model), ("pipeline", pipeline)):
                    best[name][key] = max(best[name].get(key, 0.0), len(picked) / seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(picked)} images of {args.root.name}, {args.model} ({type(next(iter(embedders.values()))).__name__}),"
          f" {args.workers} decoding worker(s), best of {args.repeat}")
    print("| descriptor | decode + preprocess img/s | model img/s | cbir index img/s |")
    print("|---|---|---|---|")
    for name in descriptors:
        b = best[name]
        print(f"| {name} | {b['preprocess']:.1f} | {b['model']:.1f} | {b['pipeline']:.1f} |")
    legacy, default = (best[n] for n in descriptors)
    note = (f"default / legacy: model {default['model'] / legacy['model']:.2f}x, "
            f"cbir index {default['pipeline'] / legacy['pipeline']:.2f}x")
    print(note)
    table = [{"descriptor": name, "decode + preprocess img/s": round(best[name]["preprocess"], 1),
              "model img/s": round(best[name]["model"], 1), "cbir index img/s": round(best[name]["pipeline"], 1)}
             for name in descriptors]
    out = write_result("descriptor_cost", {"table": table, "note": note},
                       extra={"images": len(picked), "dataset": args.root.name, "model": args.model,
                              "workers": args.workers, "repeat": args.repeat})
    print(f"written {out}")


if __name__ == "__main__":
    main()
