"""Preprocessors against direct references: numpy stacking, tokenizers' own encoding, PIL's
decode and resize; their resolution against a model and a schema, and every error path."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from workers.errors import DataError, SpecError
from workers.images import ImageDecoder, load_image, normalize
from workers.preprocess import (
    FeaturesPrep,
    FunctionPrep,
    ImagePrep,
    Preprocessor,
    PrepSpec,
    TensorPrep,
    TextPrep,
    stack_features,
)
from workers.tensors import TensorMeta
from workers.text import TOKEN_COUNTS, TextEncoder, tokenizer_limit


def meta(name: str, dtype: Any, *shape: int | None) -> TensorMeta:
    return TensorMeta(name, np.dtype(dtype), tuple(shape))


def metas(*items: TensorMeta) -> dict[str, TensorMeta]:
    return {m.name: m for m in items}


# --- features --------------------------------------------------------------------------------


def feature_table(rows: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {
        "i8": rng.integers(-100, 100, rows).astype(np.int8),
        "u16": rng.integers(0, 60000, rows).astype(np.uint16),
        "i64": rng.integers(-(2**40), 2**40, rows),
        "f32": rng.standard_normal(rows).astype(np.float32),
        "f64": rng.standard_normal(rows),
        "flag": rng.random(rows) < 0.5,
    }
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    return table, np.column_stack([v.astype(np.float64) for v in columns.values()])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_features_match_numpy_stacking(dtype: Any) -> None:
    table, reference = feature_table(97, seed=1)
    m = meta("x", dtype, None, 6)
    got = stack_features(table, table.column_names, m)
    assert got.dtype == dtype and got.shape == (97, 6)
    np.testing.assert_array_equal(got, reference.astype(dtype))


def test_features_over_chunked_columns_and_in_a_given_order() -> None:
    first, ref1 = feature_table(40, seed=2)
    second, ref2 = feature_table(25, seed=3)
    table = pa.concat_tables([first, second])
    assert table.column("f64").num_chunks == 2
    order = ["f64", "i8", "flag"]
    index = [first.column_names.index(c) for c in order]
    got = stack_features(table, order, meta("x", np.float32, None, 3))
    np.testing.assert_array_equal(got, np.concatenate([ref1, ref2])[:, index].astype(np.float32))


def test_features_nulls_fail_naming_the_column_and_row() -> None:
    table = pa.table({"a": pa.array([1.0, 2.0, 3.0]), "b": pa.array([4, None, 6], pa.int32())})
    with pytest.raises(DataError, match=r"feature column 'b' has 1 null value\(s\) \(the first at "
                                        r"row 11 of the shard\).*--nulls fill"):
        stack_features(table, ["a", "b"], meta("x", np.float32, None, 2), offset=10)


def test_features_nulls_fill() -> None:
    table = pa.table({"a": pa.array([1.5, None, 3.0]), "b": pa.array([4, None, 6], pa.int64())})
    got = stack_features(table, ["a", "b"], meta("x", np.float64, None, 2), "fill", -0.5)
    np.testing.assert_array_equal(got, [[1.5, 4], [-0.5, -0.5], [3.0, 6]])


def test_features_resolve_expands_globs_in_schema_order() -> None:
    schema = pa.schema([("id", pa.int64()), ("mean_b", pa.float64()), ("mean_a", pa.float32()),
                        ("worst_a", pa.int32()), ("name", pa.string())])
    spec = FeaturesPrep(columns=("mean_*", "worst_a", "mean_a"))
    resolved = spec.resolve(metas(meta("x", np.float32, None, 3)), ["x"], schema, "input 't'")
    assert resolved.columns == ("mean_b", "mean_a", "worst_a")
    assert resolved.input == "x"


@pytest.mark.parametrize("columns,model,match", [
    (("a", "b"), meta("x", np.float32, None, 3),
     r"stacks 2 column\(s\) \['a', 'b'\], but input 'x' of the model wants float32 \[N,3\] "
     r"\(3 features\); list exactly 3 columns"),
    (("a", "s"), meta("x", np.float32, None, 2),
     r"feature column 's' is string, but features must be int, float or bool"),
    (("a", "b"), meta("x", np.int64, None, 2),
     r"feature column 'a' is double, but input 'x' of the model wants int64 \[N,2\]; cast"),
    (("a",), meta("x", np.float32, None, 1, 1),
     r"stacks columns into \[N, F\], but input 'x' of the model wants float32 \[N,1,1\]"),
    (("z*",), meta("x", np.float32, None, 1), r"features pattern 'z\*' matches no column"),
    (("a", "missing"), meta("x", np.float32, None, 2),
     r"column 'missing' \(a feature of input 'x'\) is not in input 't'"),
])
def test_features_resolve_errors(columns: tuple[str, ...], model: TensorMeta, match: str) -> None:
    schema = pa.schema([("a", pa.float64()), ("b", pa.int16()), ("s", pa.string())])
    with pytest.raises(SpecError, match=match):
        FeaturesPrep(columns=columns).resolve(metas(model), [model.name], schema, "input 't'")


@pytest.mark.parametrize("kwargs,match", [
    ({"columns": ()}, "features columns must be a non-empty list"),
    ({"columns": ("a",), "nulls": "zero"}, "features nulls must be one of fail, fill"),
    ({"columns": ("a",), "fill_value": "x"}, "features fill_value must be a number"),
])
def test_features_spec_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        FeaturesPrep(**kwargs)


# --- text ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    from examples.reviews import make_tokenizer, review_texts

    return str(make_tokenizer(review_texts(800, seed=5), vocab_size=600).to_str())


def review_sample(rows: int, seed: int) -> list[str]:
    from examples.reviews import review_texts

    texts = review_texts(rows, seed=seed)
    texts[1] = ""  # an empty row still gets [CLS] [SEP]
    texts[2] = " ".join(texts[3:12])  # longer than max_length below
    return texts


def reference_encoding(tokenizer_json: str, texts: list[str], max_length: int,
                       length: int | None = None) -> dict[str, np.ndarray]:
    """tokenizers' own encoding, one row at a time, truncated; padded here with [PAD]'s id."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.enable_truncation(max_length)
    rows = [tokenizer.encode(t) for t in texts]
    width = length or max(len(r.ids) for r in rows)
    pad = tokenizer.token_to_id("[PAD]")
    out = {k: np.full((len(rows), width), pad if k == "ids" else 0, np.int64)
           for k in ("ids", "attention_mask", "type_ids")}
    for i, r in enumerate(rows):
        out["ids"][i, :len(r.ids)] = r.ids
        out["attention_mask"][i, :len(r.ids)] = 1
        out["type_ids"][i, :len(r.ids)] = r.type_ids
    return out


def test_text_encoder_matches_tokenizers_padded_to_the_longest_row(tokenizer_json: str) -> None:
    texts = review_sample(50, seed=7)
    got = TextEncoder(tokenizer_json, "'t.json'", max_length=32).encode(texts)
    want = reference_encoding(tokenizer_json, texts, 32)
    assert got["ids"].shape[1] == 32  # the long row sets the width, capped at max_length
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    short = TextEncoder(tokenizer_json, "'t.json'", max_length=32).encode(texts[3:6])
    assert short["ids"].shape[1] < 32  # padding is to the batch's longest row, not max_length
    np.testing.assert_array_equal(short["ids"], reference_encoding(tokenizer_json, texts[3:6],
                                                                   32)["ids"])


def test_text_encoder_pads_to_a_fixed_length(tokenizer_json: str) -> None:
    texts = review_sample(9, seed=8)[3:]
    got = TextEncoder(tokenizer_json, "'t.json'", max_length=40, length=40).encode(texts)
    want = reference_encoding(tokenizer_json, texts, 40, length=40)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])


def test_text_without_truncation_fails_the_long_row(tokenizer_json: str) -> None:
    texts = review_sample(20, seed=9)
    encoder = TextEncoder(tokenizer_json, "'t.json'", max_length=16, truncation=False)
    with pytest.raises(DataError, match=r"column 'review' row 102 has \d+ tokens, more than "
                                        r"max_length 16, and truncation is off"):
        encoder.encode(texts, "review", offset=100)


def text_model(length: int | None = None, mask: bool = True, types: bool = True,
               dtype: Any = np.int64) -> dict[str, TensorMeta]:
    items = [meta("input_ids", dtype, None, length)]
    if mask:
        items.append(meta("attention_mask", dtype, None, length))
    if types:
        items.append(meta("token_type_ids", dtype, None, length))
    return metas(*items)


TEXT_SCHEMA = pa.schema([("review", pa.string()), ("n", pa.int64())])


def resolved_text(tokenizer_json: str, model: dict[str, TensorMeta], **kwargs: Any) -> TextPrep:
    spec = TextPrep(column="review", tokenizer="t.json", tokenizer_json=tokenizer_json, **kwargs)
    return spec.resolve(model, list(model), TEXT_SCHEMA, "input 't'")


@pytest.mark.parametrize("threads", [1, 3])
def test_text_preprocessor_feeds_the_models_token_inputs(tokenizer_json: str, threads: int
                                                         ) -> None:
    # 300 rows: with 3 threads, tokenized in chunks on the pool and joined.
    texts = review_sample(300, seed=10)
    texts[150] = "Ünïcödé façade — naïve café 😀 " * 3
    model = text_model(dtype=np.int32)
    spec = resolved_text(tokenizer_json, model, max_length=24)
    with Preprocessor([spec], model, threads=threads) as prep:
        feeds = prep(pa.table({"review": texts})).feeds
        assert prep.token_pads == {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
    want = reference_encoding(tokenizer_json, texts, 24)
    assert sorted(feeds) == [TOKEN_COUNTS, "attention_mask", "input_ids", "token_type_ids"]
    np.testing.assert_array_equal(feeds[TOKEN_COUNTS], want["attention_mask"].sum(axis=1))
    assert feeds["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(feeds["input_ids"], want["ids"])
    np.testing.assert_array_equal(feeds["attention_mask"], want["attention_mask"])
    np.testing.assert_array_equal(feeds["token_type_ids"], want["type_ids"])


def test_text_tokenizes_in_helper_processes_shared_across_preprocessors(tokenizer_json: str
                                                                         ) -> None:
    import os

    import workers.text
    from workers.helpers import HelperProcesses

    texts = review_sample(400, seed=11)
    texts[200] = "Ünïcödé façade — naïve café 😀 " * 3
    model = text_model()
    helpers = HelperProcesses(3)
    try:
        files = []
        for max_length in (24, 12):  # two encoders in the same processes, each its own
            spec = resolved_text(tokenizer_json, model, max_length=max_length)
            with Preprocessor([spec], model, threads=3, processes=helpers) as prep:
                feeds = prep(pa.table({"review": texts})).feeds
                files += [f.path for f in prep._token_files]
                assert all(os.path.exists(path) for path in files[-1:])
            want = reference_encoding(tokenizer_json, texts, max_length)
            np.testing.assert_array_equal(feeds["input_ids"], want["ids"])
            np.testing.assert_array_equal(feeds["token_type_ids"], want["type_ids"])
            np.testing.assert_array_equal(feeds[TOKEN_COUNTS], want["attention_mask"].sum(axis=1))
        assert len(files) == 2 and not any(os.path.exists(path) for path in files)
        # Every chunk ran in a helper: this process loaded no helper encoder of its own.
        assert workers.text._HELPER_ENCODERS == {}
    finally:
        helpers.close()


def test_text_too_long_in_a_helper_process_names_the_shard_row(tokenizer_json: str) -> None:
    texts = [f"a short review {i}" for i in range(300)]
    texts[250] = " ".join(review_sample(40, seed=12)[3:])  # in the last of the three chunks
    model = text_model()
    spec = resolved_text(tokenizer_json, model, max_length=16, truncation=False)
    with Preprocessor([spec], model, threads=3) as prep, \
            pytest.raises(DataError, match=r"column 'review' row 1250 has \d+ tokens, more than "
                                           r"max_length 16, and truncation is off; turn "
                                           r"truncation on or raise max_length"):
        prep(pa.table({"review": texts}), offset=1000)


def test_text_resolve_fills_defaults_from_the_model(tokenizer_json: str) -> None:
    spec = resolved_text(tokenizer_json, text_model(length=48, types=False))
    assert (spec.max_length, spec.attention_mask, spec.token_type_ids) == (48, "attention_mask",
                                                                           None)
    assert spec.inputs == ("input_ids", "attention_mask")
    assert spec.token_width(text_model(length=48, types=False)) is None  # one width: the model's
    assert resolved_text(tokenizer_json, text_model()).max_length == 512
    assert resolved_text(tokenizer_json, text_model()).token_width(text_model()) == 512
    assert resolved_text(tokenizer_json, text_model(), padding="max_length",
                         max_length=32).token_width(text_model()) is None


def test_text_limit_comes_from_the_tokenizer_and_the_model(tokenizer_json: str) -> None:
    positions = (384, "its position embedding 'pos_emb' has 384 rows")
    model = text_model()
    # The tokenizer's own truncation setting, below the model's limit, is the default.
    truncating = tokenizer_limit('{"truncation": {"max_length": 128, "strategy": "LongestFirst"}}')
    assert truncating == (128, "tokenizer.json truncation max_length")
    spec = resolved_text(tokenizer_json, model, tokenizer_limit=truncating,
                         model_positions=positions)
    assert spec.max_length == 128
    assert spec.limits_text() == ("max_length 128; limits: 128 (tokenizer.json truncation "
                                  "max_length), 384 (its position embedding 'pos_emb' has 384 "
                                  "rows)")
    # A tokenizer config's model_max_length, capped at the model's position table.
    config = tokenizer_limit(tokenizer_json, '{"model_max_length": 512}')
    assert config == (512, "tokenizer_config.json model_max_length")
    assert resolved_text(tokenizer_json, model, tokenizer_limit=config,
                         model_positions=positions).max_length == 384
    # "No limit" sentinels and tokenizers without truncation say nothing.
    assert tokenizer_limit(tokenizer_json, '{"model_max_length": 1000000000000000019884624838656}'
                           ) is None
    assert tokenizer_limit(tokenizer_json) is None
    # A max_length within the model's limit may exceed the tokenizer's.
    assert resolved_text(tokenizer_json, model, tokenizer_limit=truncating,
                         model_positions=positions, max_length=256).max_length == 256


@pytest.mark.parametrize("model,positions,match", [
    (text_model(), (384, "its position embedding 'pos_emb' has 384 rows"),
     r"text max_length 600 \(--max-length\) is above the model's limit of 384 tokens \(its "
     r"position embedding 'pos_emb' has 384 rows\); set --max-length 384 or less"),
    (text_model(length=64), None,
     r"text max_length 600 \(--max-length\) is above the model's limit of 64 tokens \(input "
     r"'input_ids' is int64 \[N,64\]\); set --max-length 64 or less"),
])
def test_a_max_length_above_the_models_limit_names_both(
        tokenizer_json: str, model: dict[str, TensorMeta], positions: tuple[int, str] | None,
        match: str) -> None:
    with pytest.raises(SpecError, match=match):
        resolved_text(tokenizer_json, model, max_length=600, model_positions=positions)


def test_text_nulls(tokenizer_json: str) -> None:
    model = text_model()
    table = pa.table({"review": ["good", None, "bad"]})
    with Preprocessor([resolved_text(tokenizer_json, model)], model) as prep, \
            pytest.raises(DataError, match=r"text column 'review' has 1 null value\(s\) \(the "
                                           r"first at row 6 of the shard\).*--nulls fill"):
        prep(table, offset=5)
    with Preprocessor([resolved_text(tokenizer_json, model, nulls="fill")], model) as prep:
        ids = prep(table).feeds["input_ids"]
    np.testing.assert_array_equal(ids[1], reference_encoding(tokenizer_json, ["good", "", "bad"],
                                                             512)["ids"][1])


@pytest.mark.parametrize("model,kwargs,schema,match", [
    (metas(meta("ids", np.int64, None, None)), {}, TEXT_SCHEMA,
     r"feeds token ids to input 'input_ids', but the model's inputs are \['ids'\]; set "
     r"input_ids:"),
    (text_model(), {"attention_mask": "mask"}, TEXT_SCHEMA,
     r"feeds attention_mask to input 'mask', but the model's inputs are"),
    (text_model(length=16), {"max_length": 32}, TEXT_SCHEMA,
     r"max_length 32 \(--max-length\) is above the model's limit of 16 tokens"),
    (text_model(dtype=np.float32), {}, TEXT_SCHEMA,
     r"feeds int \[N, L\] token arrays, but input 'input_ids' of the model wants float32"),
    (text_model(), {}, pa.schema([("review", pa.binary())]),
     r"text column 'review' is binary, but the text preprocessor tokenizes strings"),
    (text_model(), {}, pa.schema([("other", pa.string())]),
     r"column 'review' \(the text to tokenize\) is not in input 't'; its columns are \['other'\]"),
])
def test_text_resolve_errors(tokenizer_json: str, model: dict[str, TensorMeta],
                             kwargs: dict[str, Any], schema: pa.Schema, match: str) -> None:
    spec = TextPrep(column="review", tokenizer="t.json", tokenizer_json=tokenizer_json, **kwargs)
    with pytest.raises(SpecError, match=match):
        spec.resolve(model, list(model), schema, "input 't'")


@pytest.mark.parametrize("kwargs,match", [
    ({"column": "", "tokenizer": "t"}, "needs the text column; pass --text-column"),
    ({"column": "c", "tokenizer": ""}, "needs a tokenizer; pass --tokenizer"),
    ({"column": "c", "tokenizer": "t", "max_length": 0}, "text max_length must be an integer >= 1"),
    ({"column": "c", "tokenizer": "t", "padding": "right"}, "text padding must be one of"),
])
def test_text_spec_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        TextPrep(**kwargs)


def test_a_broken_tokenizer_file_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"tokenizer 'bad.json' cannot be loaded .*tokenizer.json"):
        TextEncoder('{"not": "a tokenizer"}', "'bad.json'", max_length=8)


# --- images ----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def sample_images(seed: int) -> list[bytes]:
    """Random pictures of several sizes and modes, as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (32, 32), (75, 20), (17, 50), (64, 48)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        if i % 3 == 1:
            image = image.convert("L")
        elif i % 3 == 2:
            image = image.convert("RGBA")
        out.append(encode(image, "PNG"))
        out.append(encode(image.convert("RGB"), "JPEG", quality=90))
    out.append(encode(Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8), "L").convert("P"),
                      "PNG"))
    return out


def pil_pixels(data: bytes, size: tuple[int, int], shorter: int, mode: str = "RGB"
               ) -> np.ndarray:
    """PIL's decode and convert, a bilinear resize of the shorter side, a center crop: uint8 HWC."""
    image = Image.open(io.BytesIO(data)).convert(mode)
    w, h = image.size
    nw, nh = (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)
    image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = round((nh - size[0]) / 2), round((nw - size[1]) / 2)
    array = np.asarray(image.crop((left, top, left + size[1], top + size[0])))
    return array[:, :, None] if array.ndim == 2 else array


def pil_reference(data: bytes, size: tuple[int, int], shorter: int, mean: Any, std: Any,
                  mode: str = "RGB") -> np.ndarray:
    """`pil_pixels`, then (x / 255 - mean) / std in float64: HWC."""
    array = pil_pixels(data, size, shorter, mode).astype(np.float64) / 255.0
    return (array - np.asarray(mean)) / np.asarray(std)


def resolved_image(model: dict[str, TensorMeta], **kwargs: Any) -> ImagePrep:
    schema = pa.schema([("jpeg", pa.binary()), ("uid", pa.int64())])
    return ImagePrep(column="jpeg", **kwargs).resolve(model, list(model), schema, "input 't'")


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("layout,shape", [("NCHW", (None, 3, 24, 20)),
                                          ("NHWC", (None, 24, 20, 3))])
@pytest.mark.parametrize("threads", [1, 3])
def test_image_preprocessor_matches_pil(layout: str, shape: tuple[Any, ...], threads: int
                                        ) -> None:
    images = sample_images(seed=3)
    model = metas(meta("pixels", np.float32, *shape))
    # draft off: a full decode, as the reference does (draft's DCT scaling is tested below)
    spec = resolved_image(model, mean=MEAN, std=STD, resize=28, draft=False)
    assert (spec.layout, spec.size, spec.mode) == (layout, (24, 20), "RGB")
    with Preprocessor([spec], model, threads=threads) as prep:
        got = prep(pa.table({"jpeg": pa.array(images, pa.binary())})).feeds["pixels"]
    want = np.stack([pil_reference(d, (24, 20), 28, MEAN, STD) for d in images])
    if layout == "NCHW":
        want = want.transpose(0, 3, 1, 2)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_image_defaults_come_from_the_model_and_gray_models_get_l() -> None:
    images = sample_images(seed=4)
    model = metas(meta("x", np.float16, None, 1, 16, 16))
    spec = resolved_image(model, draft=False)
    assert (spec.size, spec.resize, spec.mode, spec.mean, spec.std) == (
        (16, 16), 16, "L", (0.0,), (1.0,))
    with Preprocessor([spec], model) as prep:
        got = prep(pa.table({"jpeg": pa.array(images, pa.binary())})).feeds["x"]
    want = np.stack([pil_reference(d, (16, 16), 16, 0.0, 1.0, mode="L") for d in images])
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), want.transpose(0, 3, 1, 2), atol=1e-3)


def test_image_uint8_models_get_raw_pixels() -> None:
    images = sample_images(seed=5)
    model = metas(meta("x", np.uint8, None, 12, 12, 3))
    with Preprocessor([resolved_image(model, draft=False)], model) as prep:
        got = prep(pa.table({"jpeg": pa.array(images, pa.binary())})).feeds["x"]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.stack([pil_pixels(d, (12, 12), 12) for d in images]))


def test_jpeg_draft_decoding_is_close_to_a_full_decode() -> None:
    rng = np.random.default_rng(6)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((32, 32, 1))).astype(np.uint8)
    data = encode(Image.fromarray(smooth, "RGB"), "JPEG", quality=95)  # 1280 x 960
    full = load_image(data, "RGB", (64, 64), 64).astype(np.float64)
    draft = load_image(data, "RGB", (64, 64), 64, draft=True).astype(np.float64)
    assert np.abs(full - draft).mean() < 4.0


def bad_images() -> list[bytes | None]:
    good = sample_images(seed=7)
    return [good[0], good[1][: len(good[1]) // 2], b"not an image", None, good[2], good[3]]


def test_corrupt_images_fail_the_batch_by_default() -> None:
    model = metas(meta("x", np.float32, None, 3, 8, 8))
    with Preprocessor([resolved_image(model)], model) as prep, \
            pytest.raises(DataError, match=r"image column 'jpeg' row 41 of the shard: cannot decode "
                                           r"image .*3 bad image\(s\) in this batch; set on_error: "
                                           r"skip \(--on-bad-image skip\)"):
        prep(pa.table({"jpeg": pa.array(bad_images(), pa.binary())}), offset=40)


def test_corrupt_images_are_dropped_and_reported_with_skip() -> None:
    model = metas(meta("x", np.float32, None, 3, 8, 8), meta("meta", np.float32, None, 2))
    table = pa.table({"jpeg": pa.array(bad_images(), pa.binary()),
                      "m": pa.array(np.arange(12, dtype=np.float32).reshape(6, 2).tolist(),
                                    pa.list_(pa.float32(), 2))})
    specs: list[PrepSpec] = [resolved_image(metas(model["x"]), on_error="skip", draft=False),
                             TensorPrep(column="m", input="meta")]
    with Preprocessor(specs, model) as prep:
        prepared = prep(table)
    assert sorted(prepared.failed) == [1, 2, 3]
    assert prepared.failed[3] == ("jpeg", "null image")
    assert "cannot decode image" in prepared.failed[2][1]
    np.testing.assert_array_equal(prepared.good_rows(), [0, 4, 5])
    assert prepared.feeds["x"].shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(prepared.feeds["meta"], [[0, 1], [8, 9], [10, 11]])
    good = [bad_images()[i] for i in (0, 4, 5)]
    want = np.stack([pil_reference(d, (8, 8), 8, 0.0, 1.0) for d in good])  # type: ignore[arg-type]
    np.testing.assert_allclose(prepared.feeds["x"], want.transpose(0, 3, 1, 2), atol=1e-6)


@pytest.mark.parametrize("shape,kwargs,match", [
    ((None, 3, None, None), {}, r"input 'x' \(float32 \[N,3,\?,\?\]\) has a dynamic height or "
                                r"width; pass --image-size H,W"),
    ((None, 3, 3, 3), {}, r"cannot tell whether input 'x' \(float32 \[N,3,3,3\]\) is NCHW or NHWC;"
                          r" pass --layout"),
    ((None, 4, 8, 8), {"layout": "NCHW"}, r"has 4 channels; the image preprocessor makes 3"),
    ((None, 3, 8, 8), {"mode": "L"}, r"image mode L gives 1 channel\(s\), but input 'x' wants 3"),
    ((None, 3, 8, 8), {"size": (9, 9)}, r"image size \[9, 9\] does not fit input 'x'"),
    ((None, 3, 8, 8), {"resize": 4}, r"image resize 4 is smaller than the crop \[8, 8\]"),
    ((None, 3, 8, 8), {"mean": (0.5,)}, r"image mean has 1 value\(s\), but mode RGB has 3"),
    ((None, 8, 8), {}, r"makes \[N, C, H, W\] or \[N, H, W, C\] pixels, but input 'x'"),
])
def test_image_resolve_errors(shape: tuple[Any, ...], kwargs: dict[str, Any], match: str) -> None:
    model = metas(meta("x", np.float32, *shape))
    with pytest.raises(SpecError, match=match):
        resolved_image(model, **kwargs)


def test_image_resolve_errors_on_column_type_and_raw_pixel_normalization() -> None:
    model = metas(meta("x", np.float32, None, 3, 8, 8))
    with pytest.raises(SpecError, match=r"image column 'uid' is int64, but the image preprocessor "
                                        r"decodes binary columns"):
        ImagePrep(column="uid").resolve(model, ["x"], pa.schema([("uid", pa.int64())]), "t")
    with pytest.raises(SpecError, match=r"raw integer pixels, which cannot be normalized"):
        resolved_image(metas(meta("x", np.uint8, None, 3, 8, 8)), mean=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("kwargs,match", [
    ({"column": ""}, "needs the image column; pass --image-column"),
    ({"column": "c", "size": (0, 4)}, "image size must be an integer >= 1"),
    ({"column": "c", "std": (1.0, 0.0, 1.0)}, r"image std must not contain 0"),
    ({"column": "c", "layout": "CHW"}, "image layout must be one of auto, NCHW, NHWC"),
    ({"column": "c", "on_error": "ignore"}, "image on_error must be one of fail, skip"),
])
def test_image_spec_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        ImagePrep(**kwargs)


def test_normalize_layouts_and_dtypes() -> None:
    rng = np.random.default_rng(8)
    pixels = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    got = normalize(pixels, MEAN, STD, "NCHW", np.dtype(np.float64))
    want = ((pixels / 255.0 - np.asarray(MEAN)) / np.asarray(STD)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.flags.c_contiguous


def test_image_decoder_threads_split_rows_without_changing_them() -> None:
    images = sample_images(seed=9) * 3
    one, bad1 = ImageDecoder("RGB", (10, 10), 12).decode(images)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        many, bad4 = ImageDecoder("RGB", (10, 10), 12, pool=pool, threads=4).decode(images)
    assert bad1 == bad4 == {}
    np.testing.assert_array_equal(one, many)


# --- user functions --------------------------------------------------------------------------


FUNCTION_TABLE = pa.table({"a": pa.array([1.0, 2.0, 3.0]), "b": pa.array([1, 2, 3], pa.int64())})


@pytest.mark.parametrize("target", ["tests.user_functions:scale_features",
                                    "tests.user_functions:as_dict"])
def test_function_preprocessor_array_or_dict(target: str) -> None:
    model = metas(meta("x", np.float32, None, 2))
    spec = FunctionPrep(function=target, columns=("a", "b")).resolve(
        model, ["x"], FUNCTION_TABLE.schema, "t")
    assert spec.inputs == ("x",)
    with Preprocessor([spec], model) as prep:
        got = prep(FUNCTION_TABLE).feeds["x"]
    np.testing.assert_array_equal(got, [[1, 2], [2, 4], [3, 6]])


@pytest.mark.parametrize("target,match", [
    ("tests.user_functions:wrong_shape", r"preprocess function 'tests.user_functions:wrong_shape' "
                                         r"returned shape \[3, 3\] for input 'x' and a batch of 3 "
                                         r"rows; the model wants float32 \[N,2\] with N=3"),
    ("tests.user_functions:wrong_rows", r"returned shape \[4, 2\] for input 'x' and a batch of 3"),
    ("tests.user_functions:wrong_keys", r"returned inputs \['y'\], but it feeds \['x'\]"),
    ("tests.user_functions:strings", r"returned <U1 for input 'x'; return numbers"),
])
def test_function_preprocessor_result_errors(target: str, match: str) -> None:
    model = metas(meta("x", np.float32, None, 2))
    spec = FunctionPrep(function=target, columns=("a", "b"), inputs=("x",))
    with Preprocessor([spec], model) as prep, pytest.raises(DataError, match=match):
        prep(FUNCTION_TABLE)


@pytest.mark.parametrize("target,match", [
    ("tests.no_such_module:fn", r"preprocess function 'tests.no_such_module:fn': cannot import "
                                r"module 'tests.no_such_module' \(ModuleNotFoundError: .*\); make "
                                r"it importable here.*--working-dir"),
    ("tests.user_functions:nope", r"module 'tests.user_functions' has no attribute 'nope'"),
    ("tests.user_functions:NOT_CALLABLE", r"'tests.user_functions:NOT_CALLABLE' is a int, not a "
                                          r"function"),
])
def test_function_preprocessor_import_errors(target: str, match: str) -> None:
    model = metas(meta("x", np.float32, None, 2))
    with pytest.raises(SpecError, match=match):
        FunctionPrep(function=target, columns=("a",)).resolve(model, ["x"], FUNCTION_TABLE.schema,
                                                              "t")


def test_function_preprocessor_spec_errors() -> None:
    with pytest.raises(SpecError, match=r"preprocess function 'mypkg.fn' is not an import path"):
        FunctionPrep(function="mypkg.fn", columns=("a",))
    with pytest.raises(SpecError, match=r"must be a non-empty list of column names"):
        FunctionPrep(function="mypkg:fn", columns=())
    model = metas(meta("x", np.float32, None, 2))
    with pytest.raises(SpecError, match=r"feeds input\(s\) \['y'\], but the model's inputs are"):
        FunctionPrep(function="tests.user_functions:as_dict", columns=("a",), inputs=("y",)
                     ).resolve(model, ["x"], FUNCTION_TABLE.schema, "t")
    with pytest.raises(SpecError, match=r"has no model input left to feed"):
        FunctionPrep(function="tests.user_functions:as_dict", columns=("a",)
                     ).resolve(model, [], FUNCTION_TABLE.schema, "t")


# --- tensor and input choice -----------------------------------------------------------------


def test_tensor_preprocessor_is_todays_conversion() -> None:
    from workers.convert import column_to_tensor

    values = np.random.default_rng(10).standard_normal((5, 3)).astype(np.float32)
    table = pa.table({"v": pa.FixedShapeTensorArray.from_numpy_ndarray(values)})
    model = metas(meta("x", np.float32, None, 3))
    spec = TensorPrep(column="v").resolve(model, ["x"], table.schema, "t")
    with Preprocessor([spec], model) as prep:
        got = prep(table).feeds["x"]
    np.testing.assert_array_equal(got, column_to_tensor("v", table.column("v"), model["x"]))


def test_a_preprocessor_without_an_input_needs_exactly_one_left() -> None:
    model = metas(meta("x", np.float32, None, 2), meta("y", np.float32, None, 2))
    schema = pa.schema([("a", pa.float32()), ("b", pa.float32())])
    with pytest.raises(SpecError, match=r"the features preprocessor does not say which model input "
                                        r"it feeds, and inputs \['x', 'y'\] are left; name it with "
                                        r"--features INPUT=COLUMN"):
        FeaturesPrep(columns=("a", "b")).resolve(model, ["x", "y"], schema, "t")
    with pytest.raises(SpecError, match=r"feeds input 'z', but the model's inputs are \['x', 'y'\]"):
        FeaturesPrep(columns=("a", "b"), input="z").resolve(model, ["x", "y"], schema, "t")


# --- through the shard pipeline, on both paths --------------------------------------------------


class CpuFill:
    """`GpuImages`' interface without a GPU: every row decodes on the CPU (its fallback path), and
    the fill writes the slot's host buffer as the fit kernel writes the device's (the fake slots
    compute from their host buffers). So the object-array feeds, their batching, bad rows and the
    slots' device-fill hook run in CI."""

    #: Decodes on the CPU threads, as decode auto's libjpeg-turbo path does: so its batches are
    #: decoded `image_tables` at a time (`Preprocessor.concurrency`).
    decoder = "turbo"

    def __init__(self, specs: Any, model: dict[str, TensorMeta]) -> None:
        from workers.gpuimages import fit_targets

        self.targets = fit_targets(specs, model)
        self.inputs = frozenset(self.targets)
        self.filled_rows = 0

    def decode(self, name: str, values: list[bytes | None], cpu: ImageDecoder
               ) -> tuple[np.ndarray, dict[int, str]]:
        assert cpu.dtype == np.uint8 and cpu.layout == "NHWC", "the CPU's part must be raw pixels"
        pixels, bad = cpu.decode(values)
        out = np.empty(len(values), dtype=object)
        for i in range(len(values)):
            out[i] = None if i in bad else pixels[i]
        return out, bad

    def fill(self, slot: Any, name: str, parts: Any, rows: int) -> None:
        t = self.targets[name]
        put = ImageDecoder(t.mode, t.size, t.resize, mean=t.mean, std=t.std, layout=t.layout,
                           dtype=t.dtype).put
        host, row = slot.host_inputs[name], 0
        for part in parts:
            for pixels in part:
                put(pixels, host[row])
                row += 1
        assert row == rows
        host[rows:] = 0
        self.filled_rows += rows
        slot.filled_inputs = slot.filled_inputs | {name}


def run_shard(backend_name: str, model_bytes: bytes, shard: Any, config: Any) -> Any:
    """process_shard on the CPU path (ONNX Runtime), the K-slots path (thread slots), or that
    with the image inputs as device fills (`CpuFill`)."""
    from tests.workers.test_pipeline import ThreadSlotBackend
    from workers.backends.base import BackendConfig
    from workers.backends.onnxruntime import OnnxRuntimeBackend
    from workers.pipeline import process_shard

    backend = (ThreadSlotBackend(model_bytes) if backend_name in ("slots", "device-fill")
               else OnnxRuntimeBackend(model_bytes, BackendConfig(device="cpu")))
    with backend:
        images = (CpuFill(config.preprocess, {m.name: m for m in backend.inputs})
                  if backend_name == "device-fill" else None)
        result = process_shard(shard, config, backend, images=images)  # type: ignore[arg-type]
        if images is not None:
            assert images.filled_rows == result.rows
            filled = [f for slot in backend.opened for f in slot.filled]
            assert filled and all(f == images.inputs for f in filled)
        return result


def parquet_shard(path: str) -> Any:
    from tests.workers.test_pipeline import whole_file_shard

    return whole_file_shard(path)


@pytest.mark.parametrize("path", ["sync", "slots", "device-fill"])
def test_pipeline_skips_bad_images_and_postprocesses(path: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from tests.models import two_input_model
    from workers.backends.base import BackendConfig
    from workers.backends.onnxruntime import OnnxRuntimeBackend
    from workers.postprocess import ArgmaxPost, RawPost
    from workers.types import WorkerConfig

    model_bytes = two_input_model(seed=2, image=(3, 8, 8), features=2, classes=4)
    rng = np.random.default_rng(11)
    images: list[bytes | None] = list(sample_images(seed=12) * 8)  # 104 rows
    bad = {5, 40, 41, 97}
    for i in bad:
        images[i] = b"\xff\xd8 broken" if i != 41 else None
    a, b = rng.standard_normal(len(images)), rng.integers(-3, 3, len(images))
    uid = np.arange(1000, 1000 + len(images))
    pq.write_table(pa.table({"uid": uid, "jpeg": pa.array(images, pa.binary()), "a": a, "b": b}),
                   tmp_path / "in.parquet", row_group_size=30)
    model = metas(meta("image", np.float32, None, 3, 8, 8), meta("meta", np.float32, None, 2))
    specs = (resolved_image(metas(model["image"]), on_error="skip", mean=MEAN, std=STD,
                            draft=False),
             FeaturesPrep(columns=("a", "b"), input="meta"))
    config = WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
                          output_url=str(tmp_path / "out"), bindings=(), keep=("uid",),
                          batch_size=16, preprocess=specs,
                          postprocess=(RawPost(outputs=("logits",)), ArgmaxPost(output="logits")),
                          preprocess_threads=2)
    result = run_shard(path, model_bytes, parquet_shard(str(tmp_path / "in.parquet")), config)
    good = [i for i in range(len(images)) if i not in bad]
    assert (result.rows, result.rows_failed) == (len(good), 4)
    assert [f["key"]["uid"] for f in result.row_failures] == [1005, 1040, 1041, 1097]
    assert result.row_failures[2]["reason"] == "null image"
    part = pq.read_table(result.part_url)
    assert part.column_names == ["uid", "logits", "label", "score"]
    np.testing.assert_array_equal(part.column("uid").to_numpy(), uid[good])
    pixels = np.stack([pil_reference(images[i], (8, 8), 8, MEAN, STD)  # type: ignore[arg-type]
                       for i in good]).transpose(0, 3, 1, 2).astype(np.float32)
    feats = np.stack([a[good], b[good]], axis=1).astype(np.float32)
    with OnnxRuntimeBackend(model_bytes, BackendConfig(device="cpu")) as direct:
        logits = direct.infer({"image": pixels, "meta": feats})["logits"]
    got = np.stack(part.column("logits").combine_chunks().to_numpy_ndarray())
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(part.column("label").to_numpy(), logits.argmax(axis=1))


@pytest.mark.parametrize("path", ["sync", "slots", "device-fill"])
def test_pipeline_reads_an_image_directory(path: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from jobs.shards import cut_file_shards, list_image_files, list_input
    from tests.models import two_input_model
    from workers.backends.base import BackendConfig
    from workers.postprocess import TopKPost
    from workers.types import WorkerConfig

    images = sample_images(seed=13)
    (tmp_path / "imgs").mkdir()
    for i, data in enumerate(images):
        suffix = "png" if data.startswith(b"\x89PNG") else "jpg"
        (tmp_path / "imgs" / f"{i:02d}.{suffix}").write_bytes(data)
    files, _ = list_image_files(*list_input(str(tmp_path / "imgs")))
    shard = cut_file_shards(files, 100)[0]
    model_bytes = two_input_model(seed=3, image=(3, 6, 6), features=1, classes=5)
    model = metas(meta("image", np.float32, None, 3, 6, 6), meta("meta", np.float32, None, 1))
    config = WorkerConfig(
        backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
        output_url=str(tmp_path / "out"), bindings=(), keep=("path",), batch_size=5,
        preprocess=(ImagePrep(column="image").resolve(metas(model["image"]), ["image"],
                                                       pa.schema([("image", pa.binary())]), "t"),
                    FunctionPrep(function="tests.workers.test_preprocess:zeros",
                                 columns=("path",), inputs=("meta",))),
        postprocess=(TopKPost(output="logits", k=2),))
    result = run_shard(path, model_bytes, shard, config)
    part = pq.read_table(result.part_url)
    assert part.column("path").to_pylist() == [f.url for f in files]
    assert part.column("topk_labels").type == pa.list_(pa.int32(), 2)
    assert result.rows == len(images)


def zeros(table: pa.Table) -> np.ndarray:
    """A user preprocess function: one zero feature per row."""
    return np.zeros((table.num_rows, 1), np.float32)


@pytest.mark.parametrize("path", ["sync", "slots"])
def test_pipeline_embeds_text_with_the_mask_carried_to_the_postprocessor(
        path: str, tmp_path: Path, tokenizer_json: str) -> None:
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from examples.reviews import encoder_model
    from workers.backends.base import BackendConfig
    from workers.backends.onnxruntime import OnnxRuntimeBackend
    from workers.postprocess import EmbeddingPost
    from workers.types import WorkerConfig

    length = 24
    model_bytes = encoder_model(Tokenizer.from_str(tokenizer_json).get_vocab_size(), hidden=16,
                                heads=2, layers=1, ffn=32, max_positions=64, seed=4,
                                sequence=length).SerializeToString()
    texts = review_sample(70, seed=14)
    pq.write_table(pa.table({"id": np.arange(70), "review": texts}), tmp_path / "in.parquet",
                   row_group_size=25)
    model = text_model(length=length)
    config = WorkerConfig(
        backend="onnxruntime", backend_config=BackendConfig(device="cpu"),
        output_url=str(tmp_path / "out"), bindings=(), keep=("id",), batch_size=16,
        preprocess=(resolved_text(tokenizer_json, model),),
        postprocess=(EmbeddingPost(output="last_hidden_state"),))
    result = run_shard(path, model_bytes, parquet_shard(str(tmp_path / "in.parquet")), config)
    part = pq.read_table(result.part_url)
    assert part.column_names == ["id", "embedding"]  # the carried mask never reaches the part
    got = np.stack(part.column("embedding").to_numpy(zero_copy_only=False))
    want = reference_encoding(tokenizer_json, texts, length, length=length)
    with OnnxRuntimeBackend(model_bytes, BackendConfig(device="cpu")) as direct:
        hidden = direct.infer({"input_ids": want["ids"], "attention_mask": want["attention_mask"],
                               "token_type_ids": want["type_ids"]})["last_hidden_state"]
    mask = want["attention_mask"][:, :, None]
    mean = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
