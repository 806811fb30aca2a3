"""Preprocessing throughput per worker: image decode+resize and tokenization, rows/s, against a
plain-library baseline measured in the same run, next to the model's own rows/s.

    python -m bench.preprocess [--threads 1,2,4] [--seconds 1.0] [--out bench/results]

Everything is made in the run (nothing downloaded): photo-like JPEGs and PNGs of a few sizes,
the digits example's 40 px images, review texts and the WordPiece tokenizer of
`examples.reviews`. For each source it reports:

- baseline: the library alone, one thread: PIL's decode, RGB conversion, bilinear resize of the
  shorter side and center crop in a Python loop; `tokenizers`' `encode_batch_fast` with
  truncation and padding on one call per batch;
- the runner's preprocessor (`workers.preprocess.Preprocessor`, what an actor runs), with 1..N
  threads (`--preprocess-threads`): the same work plus normalization, layout and dtype;
- the models of the examples on ONNX Runtime's CPU provider, for scale: if the preprocessor's
  rows/s at the threads a worker has is below the model's rows/s on the worker's device, the
  CPU is the limit; add --preprocess-threads (and --cpus-per-worker) or use smaller images.

A table is printed last; with --out, the numbers are also written as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from workers.preprocess import ImagePrep, Preprocessor, TextPrep
from workers.tensors import TensorMeta

BATCH = 256


def photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB picture: smooth shapes plus sensor noise (JPEG sizes like real photos)."""
    coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3)).astype(np.uint8)
    from PIL import Image

    smooth = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height),
                                                              Image.Resampling.BICUBIC))
    noise = rng.normal(0, 8, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def encoded_images(kind: str, width: int, height: int, count: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    distinct = [photo(width, height, rng) for _ in range(min(count, 8))]
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        image = Image.fromarray(distinct[i % len(distinct)], "RGB")
        if kind == "jpeg":
            image.save(buffer, format="JPEG", quality=90)
        else:
            image.save(buffer, format="PNG", compress_level=6)
        out.append(buffer.getvalue())
    return out


def rates(candidates: dict[str, Callable[[], int]], seconds: float, rounds: int = 5
          ) -> dict[str, tuple[float, float]]:
    """(rows per wall second, rows per CPU second) of each candidate (each returns the rows it
    did): medians over `rounds` rounds, every round timing each candidate in turn, so a busy
    machine slows them all alike. CPU seconds are the whole process's, every thread counted:
    rows per CPU second is what one dedicated core gives, whatever else the machine runs."""
    for run in candidates.values():
        run()  # warm-up: imports, thread start, allocator
    wall: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            rows, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - start < seconds / rounds:
                rows += run()
            wall[name].append(rows / (time.perf_counter() - start))
            cpu[name].append(rows / max(time.process_time() - cpu_start, 1e-9))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]))
            for name in candidates}


def pil_loop(images: list[bytes], size: int) -> Callable[[], int]:
    """The baseline: PIL alone, one image after another."""
    from PIL import Image

    def run() -> int:
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
            w, h = rgb.size
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
            top, left = round((nh - size) / 2), round((nw - size) / 2)
            np.asarray(rgb.crop((left, top, left + size, top + size)))
        return len(images)
    return run


def image_rows(images: list[bytes], size: int, threads: int, draft: bool = False
               ) -> Callable[[], int]:
    meta = TensorMeta("pixels", np.dtype(np.float32), (None, 3, size, size))
    schema = pa.schema([("image", pa.binary())])
    spec = ImagePrep(column="image", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     draft=draft).resolve({"pixels": meta}, ["pixels"], schema, "bench")
    prep = Preprocessor([spec], {"pixels": meta}, threads=threads)
    table = pa.table({"image": pa.array(images, pa.binary())})

    def run() -> int:
        prep(table)
        return table.num_rows
    return run


def tokenizer_baseline(tokenizer_json: str, texts: list[str], max_length: int
                       ) -> Callable[[], int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))

    def run() -> int:
        for lo in range(0, len(texts), BATCH):
            encodings = tokenizer.encode_batch_fast(texts[lo:lo + BATCH])
            np.array([e.ids for e in encodings], np.int64)
            np.array([e.attention_mask for e in encodings], np.int64)
        return len(texts)
    return run


def text_rows(tokenizer_json: str, texts: list[str], max_length: int, threads: int
              ) -> Callable[[], int]:
    metas = {n: TensorMeta(n, np.dtype(np.int64), (None, None))
             for n in ("input_ids", "attention_mask", "token_type_ids")}
    schema = pa.schema([("text", pa.string())])
    spec = TextPrep(column="text", tokenizer="bench", tokenizer_json=tokenizer_json,
                    max_length=max_length).resolve(metas, list(metas), schema, "bench")
    prep = Preprocessor([spec], metas, threads=threads)
    tables = [pa.table({"text": texts[lo:lo + BATCH]}) for lo in range(0, len(texts), BATCH)]

    def run() -> int:
        for table in tables:
            prep(table)
        return len(texts)
    return run


def model_rows(model: bytes, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], int]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rows = next(iter(feeds.values())).shape[0]

    def run() -> int:
        session.run(None, feeds)
        return rows
    return run


def long_texts(texts: list[str], words: int) -> list[str]:
    joined = " ".join(texts).split()
    return [" ".join(joined[i:i + words]) for i in range(0, len(joined) - words, words)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts (default 1,2,...,cpu count)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="timed seconds per measurement, split over 5 interleaved rounds")
    parser.add_argument("--out", help="directory for preprocess.json")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    threads = ([int(t) for t in args.threads.split(",")] if args.threads else
               sorted({1, 2, *(t for t in (4, 8, 16) if t <= cpus), cpus}))
    results: list[dict[str, Any]] = []

    def record(stage: str, source: str, how: str, n: int | None, value: tuple[float, float],
               baseline: tuple[float, float] | None) -> None:
        results.append({"stage": stage, "source": source, "how": how, "threads": n,
                        "rows_per_s": round(value[0], 1), "rows_per_cpu_s": round(value[1], 1),
                        "vs_baseline": round(value[0] / baseline[0], 2) if baseline else None,
                        "cpu_vs_baseline": round(value[1] / baseline[1], 2) if baseline
                        else None})
        print(f"  {stage:<6} {source:<28} {how:<28} {n or '-':>3}  {value[0]:>10,.0f} rows/s"
              f"  {value[1]:>10,.0f} rows/CPU-s", flush=True)

    load = os.getloadavg()
    print(f"bench.preprocess on {platform.node()} ({cpus} CPUs, load average {load[0]:.1f}), "
          f"batches of {BATCH}", flush=True)

    def compare(stage: str, source: str, baseline: tuple[str, Callable[[], int]] | None,
                make: Callable[[int], Callable[[], int]], how: str = "preprocessor") -> None:
        candidates = {f"{how} {n}": make(n) for n in threads}
        if baseline:
            candidates = {baseline[0]: baseline[1], **candidates}
        measured = rates(candidates, args.seconds * len(candidates))
        base = measured.get(baseline[0]) if baseline else None
        if baseline and base:
            record(stage, source, baseline[0], 1 if stage == "image" else None, base, None)
        for n in threads:
            record(stage, source, how, n, measured[f"{how} {n}"], base)

    image_sources = [("jpeg", 640, 480, 224), ("png", 640, 480, 224), ("jpeg", 1920, 1080, 224)]
    for kind, w, h, size in image_sources:
        images = encoded_images(kind, w, h, BATCH)
        source = f"{kind} {w}x{h} -> {size}"
        compare("image", source, ("PIL loop (baseline)", pil_loop(images, size)),
                partial(image_rows, images, size))
        if kind == "jpeg" and w > 1000:
            compare("image", source + " draft", ("PIL loop (baseline)", pil_loop(images, size)),
                    partial(image_rows, images, size, draft=True),
                    how="preprocessor, draft")

    from examples.digits import SIZE, draw_digits

    digits = draw_digits()[0][:BATCH * 2]
    compare("image", f"digits png/jpeg 40 -> {SIZE}", ("PIL loop (baseline)",
                                                       pil_loop(digits, SIZE)),
            partial(image_rows, digits, SIZE))

    from examples.reviews import make_tokenizer, review_texts

    reviews = review_texts(4096, seed=1)
    tokenizer_json = make_tokenizer(review_texts(5000, seed=100)).to_str()
    for source, texts, max_length in [("reviews (~25 tokens)", reviews[:2048], 128),
                                      ("long text (~400 tokens)",
                                       long_texts(reviews * 4, 300)[:1024], 512)]:
        compare("text", source, ("encode_batch_fast (baseline)",
                                 tokenizer_baseline(tokenizer_json, texts, max_length)),
                partial(text_rows, tokenizer_json, texts, max_length))

    from examples.digits import cnn_model, train_cnn
    from examples.reviews import encoder_model

    rng = np.random.default_rng(0)
    cnn = cnn_model(train_cnn(np.zeros((1, SIZE, SIZE), np.float32), np.zeros(1, np.int64),
                              epochs=0)).SerializeToString()
    pixels = rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    compare("model", "digits CNN 3x16x16", None,
            partial(model_rows, cnn, {"pixels": pixels}), how="ONNX Runtime CPU")
    encoder = encoder_model(1000).SerializeToString()
    for length in (32, 128):
        ids = rng.integers(5, 1000, (BATCH, length)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "token_type_ids": np.zeros_like(ids)}
        compare("model", f"tiny BERT (2x64) T={length}", None,
                partial(model_rows, encoder, feeds),
                how="ONNX Runtime CPU")

    print(f"\nload average before: {load[0]:.1f}, after: {os.getloadavg()[0]:.1f} "
          f"({cpus} CPUs); rows/s is wall time, rows/CPU-s counts every thread's CPU time")
    print("stage  source                       how                          thr      rows/s "
          "  rows/CPU-s  vs baseline (wall, CPU)")
    for r in results:
        vs = (f"{r['vs_baseline']:.2f}x, {r['cpu_vs_baseline']:.2f}x" if r["vs_baseline"]
              else "")
        print(f"{r['stage']:<6} {r['source']:<28} {r['how']:<28} {r['threads'] or '-':>3} "
              f"{r['rows_per_s']:>11,.0f} {r['rows_per_cpu_s']:>11,.0f}  {vs}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / "preprocess.json"
        path.write_text(json.dumps({"host": platform.node(), "cpus": cpus, "batch": BATCH,
                                    "load_average": [load[0], os.getloadavg()[0]],
                                    "results": results}, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
