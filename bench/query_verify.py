#!/usr/bin/env python3
"""Query latency with and without ``--verify``: p50 / p90 per query image, the
searcher opened once (as ``cbir serve`` holds it), one query at a time.

    python bench/query_verify.py --index-dir IDX QUERY_IMAGE...

Each query runs plain (top-k) and verified (top-k searched ``max(k, 5)`` deep, the
first 5 checked with local features and geometry:
:func:`cbir_cli.search.verified_queries.verify_answers`), alternately, after one
warm-up of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from cbir_cli.search.queries import QueryRequest, answer_queries
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.search.verified_queries import CANDIDATES, verify_answers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("queries", nargs="+", type=Path)
    parser.add_argument("--index-dir", type=Path, required=True)
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args(argv)
    searcher = Searcher.open(args.index_dir)
    timings: dict[str, list[float]] = {"plain": [], "verify": []}

    def plain(path: Path) -> None:
        answer_queries(searcher, QueryRequest(images=[path]), args.k)

    def verified(path: Path) -> None:
        answers = answer_queries(searcher, QueryRequest(images=[path]), max(args.k, CANDIDATES))
        verify_answers(answers, args.k)

    plain(args.queries[0])
    verified(args.queries[0])
    for path in args.queries:
        for name, run in (("plain", plain), ("verify", verified)):
            started = time.perf_counter()
            run(path)
            timings[name].append(time.perf_counter() - started)
    table = []
    for name, values in timings.items():
        ms = 1000 * np.array(values)
        print(f"{name:<7} p50 {np.percentile(ms, 50):7.1f} ms   p90 {np.percentile(ms, 90):7.1f} ms   "
              f"({len(ms)} queries, k={args.k})")
        table.append({"query": name, "p50 ms": round(float(np.percentile(ms, 50)), 1),
                      "p90 ms": round(float(np.percentile(ms, 90)), 1), "queries": len(ms)})
    print(f"written {write_result('query_verify', {'table': table}, extra={'k': args.k})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
