"""Processing settings: flags, config items and presets -> specs; resolution against a model and a
schema; image-directory listing and shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from jobs.presets import ENRICH, RELABEL, SCORE
from jobs.processing import Processing, pool_embeddings_in_graph, resolve_processing
from jobs.shards import cut_file_shards, is_image_listing, list_image_files, list_input
from jobs.spec import spec_from_args, spec_from_settings
from jobs.validate import check_keep, resolve_bindings
from workers.errors import SpecError
from workers.postprocess import ArgmaxPost, EmbeddingPost, FunctionPost, RawPost, TopKPost
from workers.preprocess import FeaturesPrep, FunctionPrep, ImagePrep, TensorPrep, TextPrep
from workers.tensors import ModelInfo, TensorMeta

BASE = ["--model", "m.onnx", "--input", "in", "--output", "out"]


def model(inputs: list[TensorMeta], outputs: list[TensorMeta]) -> ModelInfo:
    return ModelInfo(ir_version=8, opsets={"ai.onnx": 17}, producer="t", inputs=tuple(inputs),
                     outputs=tuple(outputs))


def meta(name: str, dtype: Any, *shape: int | None) -> TensorMeta:
    return TensorMeta(name, np.dtype(dtype), tuple(shape))


def test_flags_build_preprocessors_and_postprocessors() -> None:
    spec = spec_from_args([*BASE, "--features", "x=a,b*", "--nulls", "fill", "--fill-value", "2",
                           "--image-column", "pixels=jpeg", "--image-size", "32",
                           "--mean", "0.5,0.5,0.5", "--on-bad-image", "skip",
                           "--preprocess", "meta=tests.user_functions:as_dict",
                           "--preprocess-columns", "c,d",
                           "--postprocess", "raw", "--postprocess", "topk", "--top-k", "3",
                           "--labels", "l.txt", "--no-softmax"])
    assert spec.preprocess == (
        FeaturesPrep(columns=("a", "b*"), input="x", nulls="fill", fill_value=2.0),
        ImagePrep(column="jpeg", input="pixels", size=(32, 32), mean=(0.5, 0.5, 0.5),
                  on_error="skip"),
        FunctionPrep(function="tests.user_functions:as_dict", columns=("c", "d"),
                     inputs=("meta",)))
    assert spec.postprocess == (RawPost(), TopKPost(k=3, labels="l.txt", softmax=False))


def test_config_items_and_flags_over_them(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "model: m.onnx\ninput: in\noutput: out\n"
        "preprocess:\n"
        "  - {kind: text, column: review, tokenizer: t.json, max_length: 64}\n"
        "  - {kind: image, column: jpeg, size: [8, 8]}\n"
        "postprocess: [argmax, {kind: embedding, pooling: cls, prefix: e_}]\n")
    spec = spec_from_args(["--config", str(config)])
    assert spec.preprocess == (TextPrep(column="review", tokenizer="t.json", max_length=64),
                               ImagePrep(column="jpeg", size=(8, 8)))
    assert spec.postprocess == (ArgmaxPost(), EmbeddingPost(pooling="cls", prefix="e_"))
    # An option flag sets its option on the config's items; a column flag replaces its kind's
    # item but keeps the config's other options for it.
    over = spec_from_args(["--config", str(config), "--max-length", "16",
                           "--text-column", "title", "--labels", "l.txt"])
    assert over.preprocess[1] == TextPrep(column="title", tokenizer="t.json", max_length=16)
    assert over.postprocess[0] == ArgmaxPost(labels="l.txt")
    replaced = spec_from_args(["--config", str(config), "--postprocess", "raw"])
    assert replaced.postprocess == (RawPost(),)


@pytest.mark.parametrize("argv,match", [
    (["--tokenizer", "t.json"], r"--tokenizer applies to a text preprocessor, and the job has "
                                r"none; add one with --text-column COLUMN"),
    (["--top-k", "3"], r"--top-k applies to a topk postprocessor, and the job has none; add one "
                       r"with --postprocess topk"),
    (["--labels", "l.txt", "--postprocess", "embedding"],
     r"--labels applies to a argmax/topk/sigmoid postprocessor"),
    (["--postprocess", "median"], r"postprocess\[0\] \(median\) in flags: unknown kind 'median'; "
                                  r"kinds are raw, argmax, topk, sigmoid, embedding or "
                                  r"module.path:function"),
    (["--text-column", "t"], r"the text preprocessor needs a tokenizer; pass --tokenizer"),
    (["--input-format", "images", "--preprocess-threads", "0"],
     r"preprocess_threads must be an integer >= 1"),
])
def test_flag_errors(argv: list[str], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        spec_from_args([*BASE, *argv])


@pytest.mark.parametrize("settings,match", [
    ({"preprocess": [{"kind": "text", "column": "a", "tokenizer": "t", "pad": 1}]},
     r"preprocess\[0\] \(text\) in job.yaml has unknown setting\(s\) \['pad'\]; its settings are"),
    ({"preprocess": [{"kind": "image", "column": "a", "size": [0, 1]}]},
     r"preprocess\[0\] \(image\) in job.yaml: image size must be an integer >= 1"),
    ({"preprocess": [42]}, r"preprocess\[0\] in job.yaml must be a mapping with a kind"),
    ({"preprocess": [{"kind": "hist"}]}, r"unknown kind 'hist'; kinds are tensor, features, text, "
                                         r"image or module.path:function"),
    ({"postprocess": {"kind": "topk", "k": -1}}, r"postprocess\[0\] \(topk\) in job.yaml: topk k "
                                                 r"must be an integer >= 1"),
    ({"input_format": "csv"}, r"input_format must be one of auto, parquet, images"),
])
def test_config_errors(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        spec_from_settings({"model": "m", "input": "i", "output": "o", **settings}, "job.yaml")


def test_presets_default_under_the_config_and_flags(tmp_path: Path) -> None:
    enrich = spec_from_args([*BASE, "--text-column", "review", "--tokenizer", "t.json"],
                            ENRICH.parser())
    assert enrich.preprocess == (TextPrep(column="review", tokenizer="t.json"),)
    assert enrich.postprocess == (EmbeddingPost(pooling="mean"),)
    assert spec_from_args([*BASE, "--text-column", "r", "--tokenizer", "t", "--pooling", "cls"],
                          ENRICH.parser()).postprocess == (EmbeddingPost(pooling="cls"),)
    with pytest.raises(SpecError, match=r"needs the text column; pass --text-column"):
        spec_from_args(BASE, ENRICH.parser())
    relabel = spec_from_args([*BASE, "--labels", "l.txt", "--top-k", "2"], RELABEL.parser())
    assert relabel.preprocess == (ImagePrep(column="image"),)
    assert relabel.postprocess == (ArgmaxPost(labels="l.txt"), TopKPost(k=2, labels="l.txt"))
    assert relabel.rows_per_shard == 1000
    config = tmp_path / "job.yaml"
    config.write_text("rows_per_shard: 50\npostprocess: [raw]\n")
    assert spec_from_args([*BASE, "--config", str(config)], RELABEL.parser()).rows_per_shard == 50
    assert spec_from_args(BASE, SCORE.parser()).postprocess == (RawPost(),)


# --- resolution --------------------------------------------------------------------------------


TWO_INPUTS = model([meta("image", np.float32, None, 3, 8, 8), meta("meta", np.float32, None, 2)],
                   [meta("logits", np.float32, None, 4)])
SCHEMA = pa.schema([("uid", pa.int64()), ("jpeg", pa.binary()), ("meta", pa.list_(pa.float32(), 2)),
                    ("a", pa.float64()), ("b", pa.int32())])


def resolve(settings: dict[str, Any], info: ModelInfo = TWO_INPUTS, schema: pa.Schema = SCHEMA,
            images: bool = False) -> Any:
    spec = spec_from_settings({"model": "m", "input": "i", "output": "o", **settings})
    return resolve_processing(spec, info, schema, "input 't'", resolve_bindings,
                              images_input=images)


def test_an_input_with_a_column_of_its_name_is_left_to_that_column() -> None:
    done = resolve({"preprocess": [{"kind": "image", "column": "jpeg"}], "keep": ["uid"]})
    assert done.bindings == (("meta", "meta"),)
    assert done.preprocess == (TensorPrep(column="meta", input="meta"),
                               ImagePrep(column="jpeg", input="image", size=(8, 8), resize=8,
                                         mean=(0.0,) * 3, std=(1.0,) * 3, layout="NCHW",
                                         mode="RGB", max_pixels=(32 * 8) ** 2))
    assert done.output_columns == ("logits",)
    assert not done.is_default
    pixels = pa.schema([("a", pa.float64()), ("b", pa.int32()),
                        ("px", pa.list_(pa.float32(), 192))])
    features = resolve({"preprocess": [{"kind": "features", "columns": ["a", "b"]}],
                        "columns": {"image": "px"}}, schema=pixels)
    assert features.bindings == (("image", "px"),)
    assert features.preprocess[1] == FeaturesPrep(columns=("a", "b"), input="meta")


def test_processing_errors() -> None:
    with pytest.raises(SpecError, match=r"model input 'image' is fed by both --column image=jpeg "
                                        r"and the image preprocessor; feed each input once"):
        resolve({"columns": {"image": "jpeg"},
                 "preprocess": [{"kind": "image", "column": "jpeg", "input": "image"}]})
    with pytest.raises(SpecError, match=r"on_error: skip records each dropped row by its kept "
                                        r"columns, and the job keeps none; add --keep"):
        resolve({"preprocess": [{"kind": "image", "column": "jpeg", "on_error": "skip"}]})
    with pytest.raises(SpecError, match=r"two postprocessors make column 'label'; give one a "
                                        r"prefix"):
        resolve({"preprocess": [{"kind": "image", "column": "jpeg"}],
                 "postprocess": ["argmax", "argmax"]})
    with pytest.raises(SpecError, match=r"tokenizer 'missing.json' cannot be read .*; check "
                                        r"--tokenizer"):
        resolve({"preprocess": [{"kind": "text", "column": "uid", "tokenizer": "missing.json"}]})


def test_labels_are_read_and_checked_by_the_driver(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    done = resolve({"preprocess": [{"kind": "image", "column": "jpeg"}],
                    "postprocess": [{"kind": "argmax", "labels": str(labels)}]})
    assert done.postprocess[0].label_names == ("a", "b", "c", "d")
    assert done.output_columns == ("label", "label_name", "score")
    labels.write_text("a\nb\n")
    with pytest.raises(SpecError, match=r"has 2 label\(s\), but output 'logits' of the model has 4"):
        resolve({"preprocess": [{"kind": "image", "column": "jpeg"}],
                 "postprocess": [{"kind": "topk", "labels": str(labels)}]})
    with pytest.raises(SpecError, match=r"labels file '.*nope.txt' cannot be read .*check --labels"):
        resolve({"preprocess": [{"kind": "image", "column": "jpeg"}],
                 "postprocess": [{"kind": "topk", "labels": str(tmp_path / "nope.txt")}]})


def test_kept_columns_must_not_clash_with_output_columns() -> None:
    info = model([meta("x", np.float32, None, 2)], [meta("logits", np.float32, None, 4)])
    schema = pa.schema([("x", pa.list_(pa.float32(), 2)), ("label", pa.int64()),
                        ("logits", pa.int64())])
    check_keep(("logits",), info, schema, "t", output_columns=("label", "score"))
    with pytest.raises(SpecError, match=r"--keep column\(s\) \['label'\] have the same name as "
                                        r"model output\(s\)"):
        check_keep(("label",), info, schema, "t", output_columns=("label", "score"))


def test_an_image_directory_keeps_the_path() -> None:
    from workers.images import IMAGE_DIR_SCHEMA

    info = model([meta("x", np.float32, None, 3, 8, 8)], [meta("logits", np.float32, None, 4)])
    done = resolve({"preprocess": [{"kind": "image", "column": "image", "on_error": "skip"}]},
                   info, IMAGE_DIR_SCHEMA, images=True)
    assert done.keep == ("path",)


# --- image directories -------------------------------------------------------------------------


def write_files(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode() * 3)


def test_image_listing_and_content_derived_shards(tmp_path: Path) -> None:
    write_files(tmp_path, ["a.png", "b.JPG", "sub/c.jpeg", "notes.txt", "_hidden.png"])
    fs, listing = list_input(str(tmp_path))
    assert is_image_listing(listing)
    images, others = list_image_files(fs, listing)
    assert [f.url.rsplit("/", 1)[-1] for f in images] == ["a.png", "b.JPG", "c.jpeg"]
    assert [u.rsplit("/", 1)[-1] for u in others] == ["notes.txt"]
    shards = cut_file_shards(images, 2)
    assert [s.rows for s in shards] == [2, 1]
    assert shards[0].files == tuple(images[:2]) and shards[0].url == images[0].url
    again = cut_file_shards(list_image_files(*list_input(str(tmp_path)))[0], 2)
    assert [s.id for s in again] == [s.id for s in shards]
    (tmp_path / "sub" / "c.jpeg").write_bytes(b"changed, longer content")
    changed = cut_file_shards(list_image_files(*list_input(str(tmp_path)))[0], 2)
    assert changed[0].id == shards[0].id and changed[1].id != shards[1].id
    assert "3 file(s)" not in shards[0].describe() and "2 file(s)" in shards[0].describe()
    assert shards[1].to_json()["files"] == 1


def test_a_listing_with_parquet_is_not_an_image_directory(tmp_path: Path) -> None:
    write_files(tmp_path, ["a.png", "data.parquet"])
    assert not is_image_listing(list_input(str(tmp_path))[1])


def processing_with(*posts: Any) -> Processing:
    return Processing(bindings=(), preprocess=(), postprocess=posts, keep=(),
                      output_columns=())


@pytest.fixture(scope="module")
def encoder() -> bytes:
    from examples.reviews import encoder_model

    return encoder_model(50, seed=1).SerializeToString()


def test_embedding_pooling_moves_into_the_graph(encoder: bytes) -> None:
    post = EmbeddingPost(output="last_hidden_state", mask="attention_mask", normalize=False,
                         prefix="p_")
    argmax = ArgmaxPost(output="pooler_output")
    done = pool_embeddings_in_graph(encoder, processing_with(argmax, post))
    assert done.pooled is not None and done.model_bytes == done.pooled.model_bytes
    assert done.processing.postprocess == (
        argmax, EmbeddingPost(output="last_hidden_state_pooled", pooling="none", mask=None,
                              normalize=False, prefix="p_"))
    assert "runs in the model's graph" in done.note
    import onnx

    outputs = [o.name for o in onnx.load_model_from_string(done.model_bytes).graph.output]
    assert outputs == ["last_hidden_state_pooled", "pooler_output"]  # argmax still reads it


@pytest.mark.parametrize("other,why", [
    (RawPost(outputs=("last_hidden_state", "pooler_output")),
     "another postprocessor reads output 'last_hidden_state' as it is"),
    (FunctionPost(function="tests.user_functions:total"),
     "a postprocess function reads every output"),
])
def test_embedding_pooling_stays_on_the_host_when_others_read_the_output(
        encoder: bytes, other: Any, why: str) -> None:
    processing = processing_with(EmbeddingPost(output="last_hidden_state"), other)
    done = pool_embeddings_in_graph(encoder, processing)
    assert done.pooled is None and done.model_bytes == encoder
    assert done.processing == processing
    assert done.note == f"mean pooling of output 'last_hidden_state' runs on the host: {why}"


def test_nothing_to_pool_leaves_the_model_alone(encoder: bytes) -> None:
    processing = processing_with(EmbeddingPost(output="pooler_output", pooling="none"))
    done = pool_embeddings_in_graph(encoder, processing)
    assert (done.model_bytes, done.processing, done.note) == (encoder, processing, "")
