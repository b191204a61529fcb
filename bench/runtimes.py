#!/usr/bin/env python3
"""CPU model runtimes side by side: ONNX Runtime and OpenVINO, fp32 and int8.

    pip install openvino          # optional: without it only ONNX Runtime is timed
    python bench/runtimes.py      # mobilenet_v2, 320 Oxford-17 images calibrate, 256 are embedded

The int8 models are the product's (``cbir_cli.models.quantize``: ONNX Runtime
static quantisation, QOperator) plus, for OpenVINO, the same calibration in QDQ
format (the form OpenVINO turns into its own int8 kernels). For each runtime it
prints model-only img/s and CPU core-ms per image on the same uint8 batches
(interleaved, best of --repeat), and how close its vectors are to ONNX Runtime
fp32 (cosine min / mean) over the embedded images. ``--descriptor legacy`` (the
default here: what these figures were first measured with) embeds centre crops, one
shape; ``--descriptor default`` the product's default (full image, two scales: many
shapes; every runtime gets the same per-shape groups).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import SHARED, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "oxford17flowers")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--descriptor", choices=("legacy", "default"), default="legacy",
                   help="legacy: centre crop + GAP (one input shape); default: the product's default descriptor")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return p.parse_args(argv)


def timed(run, batches) -> tuple[float, float]:
    run(batches[0])  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    images = 0
    for batch in batches:
        run(batch)
        images += len(batch)
    return images / (time.perf_counter() - started), (time.process_time() - cpu) * 1000 / images


def openvino_runner(path: Path, threads: int, dim: int, precision: str | None = None):
    """``precision``: OpenVINO's inference precision hint (default: its own choice,
    bf16 on CPUs that have it, which changes fp32 vectors)."""
    import numpy as np
    import openvino as ov

    from cbir_cli.models.scales import embed_batch

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, **({"INFERENCE_PRECISION_HINT": precision} if precision else {})}
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run_group(batch):
        return np.asarray(request.infer({0: batch})[compiled.output(0)], dtype=np.float32)

    # Many shapes (default descriptor): grouped by shape like the product's runtimes;
    # the model's height and width are dynamic, so OpenVINO re-infers shapes per group.
    return lambda batch: embed_batch(batch, run_group, dim)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.onnx_embedder import OnnxEmbedder
    from cbir_cli.models.quantize import sample_calibration
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR
    from cbir_cli.pipeline.local import LocalExecutor
    from cbir_cli.pipeline.options import ExtractOptions

    files = list_images(args.data)
    calibration = sample_calibration(files, LocalExecutor(ExtractOptions(workers=0)).hash_files)
    descriptor = LEGACY_DESCRIPTOR if args.descriptor == "legacy" else None
    fp32 = load_embedder(args.model, device="cpu", runtime="onnx", descriptor=descriptor)
    int8 = load_embedder(args.model, device="cpu", runtime="onnx", calibration=calibration, descriptor=descriptor)
    picks = np.random.default_rng(1).choice(len(files), size=min(args.images, len(files)), replace=False)
    pixels = [fp32.preprocess(load_image(files[i], draft_size=fp32.config.draft_size)) for i in picks]
    # One input shape: uint8 batches as the pipeline stacks them; many: lists, as it groups them.
    one_shape = fp32.config.descriptor.one_input_shape
    batches = [np.stack(pixels[i:i + args.batch_size]) if one_shape else pixels[i:i + args.batch_size]
               for i in range(0, len(pixels), args.batch_size)]
    runners = {"onnxruntime fp32": fp32.embed, "onnxruntime int8 (QOperator, product)": int8.embed}
    usable = True
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("openvino not installed: ONNX Runtime only (pip install openvino)")
        usable = False
    if usable:
        qdq = Path(tempfile.mkdtemp()) / "qdq.onnx"
        quantize_qdq(fp32, calibration, qdq)
        runners["onnxruntime int8 (same calibration, QDQ)"] = OnnxEmbedder(fp32.config, fp32.weights_id, qdq).embed
        for name, path, precision in (("openvino fp32 (f32 precision hint)", fp32.model_path, "f32"),
                                      ("openvino fp32 (its default precision)", fp32.model_path, None),
                                      ("openvino on the int8 QOperator model", int8.model_path, None),
                                      ("openvino int8 (same calibration, QDQ)", qdq, None)):
            try:
                runners[name] = openvino_runner(path, args.threads, fp32.dim, precision)
            except Exception as exc:  # noqa: BLE001 - a model OpenVINO cannot convert is a result too
                print(f"{name}: cannot be compiled ({str(exc).strip().splitlines()[-1][:200]})")
    reference = np.concatenate([fp32.embed(b) for b in batches])
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(args.repeat):  # interleaved: the machine is shared
        for name, run in runners.items():
            results[name].append(timed(run, batches))
    print(f"\n{args.model}, {len(pixels)} images of {args.data.name}, batch {args.batch_size}, {args.threads} threads, "
          f"int8 calibrated on {len(calibration.images)} images ({int8.model_path.name})")
    print(f"{'runtime':42s} {'img/s':>8s} {'core-ms/img':>12s} {'cos min':>8s} {'cos mean':>9s}")
    table = []
    for name, run in runners.items():
        vectors = np.concatenate([run(b) for b in batches])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cosine = (vectors * reference).sum(axis=1)
        rate = max(r for r, _ in results[name])
        core_ms = min(c for _, c in results[name])
        print(f"{name:42s} {rate:8.1f} {core_ms:12.2f} {cosine.min():8.4f} {cosine.mean():9.4f}")
        table.append({"runtime": name, "img/s": round(rate, 1), "core-ms/img": round(core_ms, 2),
                      "cos min": f"{cosine.min():.4f}", "cos mean": f"{cosine.mean():.4f}"})
    out = write_result("runtimes", {"table": table},
                       extra={"model": args.model, "images": len(pixels), "dataset": args.data.name,
                              "batch_size": args.batch_size, "threads": args.threads, "descriptor": args.descriptor})
    print(f"written {out}")
    return 0


def quantize_qdq(fp32, calibration, out: Path) -> None:
    """The product's calibration and settings, in QDQ format (for OpenVINO)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from cbir_cli.models.quantize import _calibration_batches

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _calibration_batches(calibration, fp32.preprocess, fp32.config.draft_size)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    quantize_static(str(fp32.model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


if __name__ == "__main__":
    sys.exit(main())
