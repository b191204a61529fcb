#!/usr/bin/env python3
"""``cbir dedup`` against imagededup's perceptual hashes (PHash, DHash, WHash) on
the copies protocol's distortions: pair precision / recall per distortion and F1,
each method at its default and at its best threshold.

    python -m bench.dedup_peers --gallery 300 --copies 40 --json bench-dedup-peers.json

imagededup is not a dependency of cbir: install it beside cbir (``pip install
imagededup``; a virtual environment made with ``--system-site-packages`` keeps
cbir's own packages) and run this script with that interpreter. Without it, only
cbir's rows are printed.

Data (seeded): ``--gallery`` photos of a folder (Oxford-17 by default); ``--copies``
of them get every distortion of :data:`cbir_cli.evaluate.copies.DISTORTIONS`,
written as PNG (lossless: a JPEG-20 copy keeps its artefacts) beside the photos in
a temporary folder, which is indexed with ``cbir index`` (the default model) and
deduplicated with ``cbir dedup`` as a user would.

Truth: a photo and its copies form one group; files of the folder that are the
same picture re-encoded (:func:`cbir_cli.evaluate.copies.twin_sets`) join their
original's group. Every pair a method puts in one group is a predicted pair
(cbir's groups are connected components; imagededup's lists are taken pairwise).
Recall per distortion: share of (photo, its copy) pairs predicted; precision: share
of predicted pairs that are true; F1 over all pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "oxford17flowers"
HASHES = ("PHash", "DHash", "WHash")
HASH_DEFAULT = 10  # imagededup's max_distance_threshold default
COSINE_GRID = [round(0.80 + 0.005 * i, 3) for i in range(40)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--gallery", type=int, default=300, help="photos of the folder used (seeded)")
    parser.add_argument("--copies", type=int, default=40, help="photos that get every distortion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep", type=Path, default=None, help="build the folder and index here and keep them")
    return parser.parse_args(argv)


def build_folder(args: argparse.Namespace, folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """The photos and copies below ``folder``; returns each file's truth group and
    each copy's distortion (by file name)."""
    import numpy as np

    from cbir_cli.evaluate.copies import DISTORTIONS, distort, twin_sets
    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images

    every = [str(p) for p in list_images(args.root)]
    rng = np.random.default_rng(args.seed)
    photos = sorted(rng.choice(len(every), min(args.gallery, len(every)), replace=False).tolist())
    paths = [every[i] for i in photos]
    originals = sorted(rng.choice(len(paths), min(args.copies, len(paths)), replace=False).tolist())
    group: dict[str, int] = {}
    kind: dict[str, str] = {}
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"photo_{i:04d}{Path(path).suffix.lower()}" for i, path in enumerate(paths)]
    twins = twin_sets(paths, range(len(paths)))
    for i, (name, path) in enumerate(zip(names, paths)):
        shutil.copyfile(path, folder / name)
        group[name] = int(twins[i].min())  # a re-encoded twin shares its lowest-numbered twin's group
    for i in originals:
        img = load_image(paths[i])
        for k in DISTORTIONS:
            name = f"copy_{i:04d}_{k}.png"
            distort(img, k, args.seed * 100_000 + i).save(folder / name)
            group[name] = group[names[i]]
            kind[name] = k
    return group, kind


def score(pairs: set[frozenset[str]], group: dict[str, int], kind: dict[str, str]) -> dict[str, object]:
    """Precision, recall per distortion, overall recall and F1 of predicted ``pairs``."""
    true_pairs = {frozenset(p) for p in itertools.combinations(sorted(group), 2) if group[p[0]] == group[p[1]]}
    hit = len(pairs & true_pairs)
    precision = hit / len(pairs) if pairs else 1.0
    recall = hit / len(true_pairs) if true_pairs else 0.0
    per_kind: dict[str, list[int]] = {}
    for name, k in kind.items():
        photo = next(n for n in group if n.startswith("photo_") and group[n] == group[name])
        per_kind.setdefault(k, []).append(frozenset((name, photo)) in pairs)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "pairs": len(pairs),
            "recall_per_distortion": {k: sum(v) / len(v) for k, v in per_kind.items()}}


def group_pairs(groups: list[list[str]]) -> set[frozenset[str]]:
    return {frozenset(p) for g in groups for p in itertools.combinations(sorted(set(g)), 2)}


def run_cbir(folder: Path, index: Path) -> dict[str, dict[str, object]]:
    """Predicted pairs of ``cbir dedup`` (default, and without verification), and of
    every cosine threshold on a grid with and without verification."""
    import numpy as np

    from cbir_cli.search.dedup import connected_groups, find_links
    from cbir_cli.search.dedup_verify import DedupVerification, candidate_pairs, verify_pairs
    from cbir_cli.search.searcher import Searcher

    cbir = [sys.executable, "-m", "cbir_cli"]
    if not (index / "store.json").exists():
        subprocess.run([*cbir, "index", str(folder), "--index", str(index)], check=True, stdout=subprocess.DEVNULL)
    out: dict[str, dict[str, object]] = {}
    for label, extra in (("cbir dedup (default: verify)", []), ("cbir dedup --no-verify", ["--no-verify"])):
        started = time.perf_counter()
        done = subprocess.run([*cbir, "dedup", "--index", str(index), "--json", *extra], check=True,
                              capture_output=True, text=True)
        result = json.loads(done.stdout)
        groups = [[Path(m["path"]).name for m in g["members"]] for g in result["groups"]]
        out[label] = {"pairs": group_pairs(groups), "threshold": result["threshold"],
                      "seconds": time.perf_counter() - started, "notes": result["notes"]}
    searcher = Searcher.open(index)
    names = {r.id: Path(r.path).name for r in searcher.rows}
    a, b, s = find_links(searcher, COSINE_GRID[0])
    started = time.perf_counter()
    # Every image's nearest pairs from the floor up, verified once; at threshold t
    # those below t join the links (as cbir dedup does at t).
    ca, cb, cs = candidate_pairs(searcher, DedupVerification(), 1.01)
    verified = verify_pairs(searcher, ca, cb)
    verify_seconds = time.perf_counter() - started
    for t in COSINE_GRID:
        for label, extra in ((f"cbir cosine >= {t:g}", np.zeros(len(ca), bool)),
                             (f"cbir verify, cosine >= {t:g}", verified & (cs < t))):
            links_a = np.concatenate([a[s >= t], ca[extra]])
            links_b = np.concatenate([b[s >= t], cb[extra]])
            groups = [[names[i] for i in g] for g in connected_groups(links_a, links_b)]
            out[label] = {"pairs": group_pairs(groups), "threshold": t}
    out["_verify"] = {"candidate_pairs": len(ca), "verified": int(verified.sum()),
                      "seconds": verify_seconds, "images": searcher.count}
    return out


def run_hashes(folder: Path) -> dict[str, dict[str, object]]:
    try:
        from imagededup import methods
    except ImportError:
        print("imagededup is not installed for this interpreter: its rows are left out", file=sys.stderr)
        return {}
    out: dict[str, dict[str, object]] = {}
    for name in HASHES:
        hasher = getattr(methods, name)(verbose=False)
        started = time.perf_counter()
        encodings = hasher.encode_images(image_dir=str(folder))
        seconds = time.perf_counter() - started
        for t in range(0, 33):
            found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=t)
            pairs = {frozenset((k, v)) for k, vs in found.items() for v in vs}
            out[f"{name} <= {t}"] = {"pairs": pairs, "threshold": t, "seconds": seconds}
    return out


def main(argv: list[str] | None = None) -> int:
    from cbir_cli.evaluate.copies import DISTORTIONS

    args = parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="cbir-dedup-peers-"))
    truth = work / "truth.json"
    try:
        if truth.exists():  # --keep of an earlier run with the same arguments: reuse its folder and index
            group, kind = json.loads(truth.read_text())
        else:
            group, kind = build_folder(args, work / "photos")
            truth.write_text(json.dumps([group, kind]))
        runs = {**run_cbir(work / "photos", work / "index"), **run_hashes(work / "photos")}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    verify_info = runs.pop("_verify")
    scored = {label: {**score(run["pairs"], group, kind), "threshold": run["threshold"]}
              for label, run in runs.items()}
    rows: list[tuple[str, dict[str, object]]] = []
    for label in ("cbir dedup (default: verify)", "cbir dedup --no-verify"):
        rows.append((label, scored[label]))
    for family, default in (("cbir cosine >= ", None), ("cbir verify, cosine >= ", None),
                            *((f"{h} <= ", HASH_DEFAULT) for h in HASHES)):
        mine = {k: v for k, v in scored.items() if k.startswith(family)}
        if not mine:
            continue
        best = max(mine, key=lambda k: (round(mine[k]["f1"], 9), -abs(float(mine[k]["threshold"]))))
        rows.append((f"{best} (best F1)", mine[best]))
        if default is not None:
            rows.append((f"{family}{default} (default)", mine[f"{family}{default}"]))
    header = f"{'method':<36}{'P':>6}{'R':>6}{'F1':>6}" + "".join(f"{k[:8]:>9}" for k in DISTORTIONS)
    print(f"{len(group)} files: {args.gallery} photos, {len(kind)} copies of {args.copies} of them "
          f"({args.root.name}); recall per distortion = (photo, copy) pairs grouped")
    print(header)
    for label, r in rows:
        per = r["recall_per_distortion"]
        print(f"{label:<36}{r['precision']:>6.3f}{r['recall']:>6.3f}{r['f1']:>6.3f}"
              + "".join(f"{per[k]:>9.2f}" for k in DISTORTIONS))
    seconds = {k: round(float(runs[k]["seconds"]), 2) for k in runs if "seconds" in runs[k]}
    print(f"verification: {verify_info['candidate_pairs']} candidate pairs, {verify_info['verified']} verified, "
          f"{verify_info['seconds']:.1f} s for {verify_info['images']} images")
    record = {"gallery": args.gallery, "copies": args.copies, "seed": args.seed, "root": str(args.root),
              "rows": dict(rows), "verification": verify_info, "seconds": seconds}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    print(f"written {write_result('dedup_peers', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
