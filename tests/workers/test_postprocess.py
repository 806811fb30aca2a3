"""Postprocessors: each one's values against a plain numpy reference, its Arrow types, its
resolution against a model's outputs, and every error path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from workers.convert import tensor_to_arrow
from workers.errors import DataError, SpecError
from workers.postprocess import (
    ArgmaxPost,
    EmbeddingPost,
    FunctionPost,
    Postprocessor,
    RawPost,
    SigmoidPost,
    TopKPost,
    parse_labels,
)
from workers.tensors import TensorMeta

NAMES = ("cat", "dog", "eel", "fox", "gnu", "hen", "ibis")


def meta(name: str, dtype: Any, *shape: int | None) -> TensorMeta:
    return TensorMeta(name, np.dtype(dtype), tuple(shape))


def logits(rows: int = 33, classes: int = 7, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, classes)) * 3).astype(np.float32)


def reference_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_raw_is_every_output_as_before() -> None:
    outputs = {"logits": logits(), "score": logits(classes=1)}
    columns = Postprocessor([]).__call__(outputs, {}, 33)
    assert list(columns) == ["logits", "score"]
    for name, array in outputs.items():
        assert columns[name].equals(tensor_to_arrow(name, array))
    named = Postprocessor([RawPost(outputs=("score",))])(outputs, {}, 33)
    assert list(named) == ["score"]


@pytest.mark.parametrize("softmax", [True, False])
def test_argmax_labels_names_and_scores(softmax: bool) -> None:
    x = logits()
    spec = ArgmaxPost(output="logits", label_names=NAMES, softmax=softmax, prefix="p_")
    columns = Postprocessor([spec])({"logits": x}, {}, 33)
    assert list(columns) == ["p_label", "p_label_name", "p_score"]
    assert columns["p_label"].type == pa.int32() and columns["p_score"].type == pa.float32()
    best = x.argmax(axis=1)
    np.testing.assert_array_equal(columns["p_label"].to_numpy(), best)
    assert columns["p_label_name"].to_pylist() == [NAMES[i] for i in best]
    scores = reference_softmax(x) if softmax else x.astype(np.float64)
    np.testing.assert_allclose(columns["p_score"].to_numpy(), scores[np.arange(33), best],
                               rtol=1e-6)


def test_topk_best_first_with_names() -> None:
    x = logits(seed=1)
    columns = Postprocessor([TopKPost(output="logits", k=3, label_names=NAMES)])({"logits": x},
                                                                                 {}, 33)
    assert columns["topk_labels"].type == pa.list_(pa.int32(), 3)
    assert columns["topk_names"].type == pa.list_(pa.string(), 3)
    assert columns["topk_scores"].type == pa.list_(pa.float32(), 3)
    probs = reference_softmax(x)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    assert columns["topk_labels"].to_pylist() == order.tolist()
    assert columns["topk_names"].to_pylist() == [[NAMES[i] for i in row] for row in order]
    np.testing.assert_allclose(np.array(columns["topk_scores"].to_pylist()),
                               np.take_along_axis(probs, order, axis=1), rtol=1e-6)


def test_topk_ties_keep_the_lower_class_first_and_k_may_be_every_class() -> None:
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    columns = Postprocessor([TopKPost(k=2, softmax=False)])({"o": x}, {}, 2)
    assert columns["topk_labels"].to_pylist() == [[1, 2], [0, 1]]
    every = Postprocessor([TopKPost(k=4, softmax=False)])({"o": x}, {}, 2)
    assert every["topk_labels"].to_pylist() == [[1, 2, 0, 3], [0, 1, 2, 3]]


def test_sigmoid_multilabel_lists() -> None:
    x = logits(seed=2)
    columns = Postprocessor([SigmoidPost(output="o", threshold=0.7, label_names=NAMES)])(
        {"o": x}, {}, 33)
    assert columns["labels"].type == pa.list_(pa.int32())
    assert columns["label_names"].type == pa.list_(pa.string())
    assert columns["scores"].type == pa.list_(pa.float32())
    probs = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    want = [[j for j in range(7) if probs[i, j] >= 0.7] for i in range(33)]
    assert columns["labels"].to_pylist() == want
    assert columns["label_names"].to_pylist() == [[NAMES[j] for j in row] for row in want]
    got_scores = columns["scores"].to_pylist()
    for i, row in enumerate(want):
        np.testing.assert_allclose(got_scores[i], probs[i, row], rtol=1e-6)
    assert any(not row for row in want) and any(len(row) > 1 for row in want)


def test_embedding_mean_pooling_over_the_mask_then_l2() -> None:
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((6, 9, 5)).astype(np.float32)
    lengths = [9, 1, 4, 7, 2, 9]
    mask = np.array([[1] * n + [0] * (9 - n) for n in lengths], np.int64)
    columns = Postprocessor([EmbeddingPost(output="h")])({"h": hidden}, {"attention_mask": mask}, 6)
    column = columns["embedding"]
    assert column.type == pa.list_(pa.float32(), 5)
    got = np.array(column.to_pylist())
    for i, n in enumerate(lengths):
        mean = hidden[i, :n].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling,shape", [("cls", (4, 3, 5)), ("none", (4, 5))])
def test_embedding_cls_and_already_pooled(pooling: str, shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    got = np.array(Postprocessor([EmbeddingPost(pooling=pooling, normalize=False, mask=None)])(
        {"o": x}, {}, 4)["embedding"].to_pylist())
    np.testing.assert_allclose(got, x[:, 0] if pooling == "cls" else x, rtol=1e-6)


def test_embedding_without_a_mask_averages_every_token() -> None:
    x = np.random.default_rng(5).standard_normal((3, 4, 2)).astype(np.float32)
    got = np.array(Postprocessor([EmbeddingPost(normalize=False, mask=None)])({"o": x}, {}, 3)
                   ["embedding"].to_pylist())
    np.testing.assert_allclose(got, x.mean(axis=1), rtol=1e-6)


def test_several_postprocessors_make_their_columns_in_order() -> None:
    x = logits()
    columns = Postprocessor([RawPost(), ArgmaxPost(), TopKPost(k=2)])({"logits": x}, {}, 33)
    assert list(columns) == ["logits", "label", "score", "topk_labels", "topk_scores"]
    with pytest.raises(DataError, match=r"two postprocessors make column 'label'; give one a "
                                        r"prefix"):
        Postprocessor([ArgmaxPost(), ArgmaxPost()])({"logits": x}, {}, 33)


def test_function_postprocessor() -> None:
    x = logits(rows=4)
    columns = Postprocessor([FunctionPost(function="tests.user_functions:total")])(
        {"logits": x}, {}, 4)
    np.testing.assert_allclose(columns["total"].to_numpy(), x.sum(axis=1), rtol=1e-6)
    assert columns["count"].to_pylist() == [7] * 4


@pytest.mark.parametrize("target,match", [
    ("tests.user_functions:short", r"postprocess function 'tests.user_functions:short' column "
                                   r"'total' has 1 values for a batch of 4 rows; return one value "
                                   r"per row"),
    ("tests.user_functions:not_a_dict", r"returned list; return a dict of column name -> values"),
])
def test_function_postprocessor_errors(target: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        Postprocessor([FunctionPost(function=target)])({"logits": logits(rows=4)}, {}, 4)


@pytest.mark.parametrize("spec,outputs,rows,match", [
    (ArgmaxPost(output="x"), {"logits": logits()}, 33,
     r"the argmax postprocessor reads output 'x', but the model returned \['logits'\]"),
    (ArgmaxPost(), {"logits": logits()[:5]}, 33,
     r"model output 'logits' has shape \[5, 7\] for a batch of 33 rows"),
    (TopKPost(), {"o": np.zeros((2, 3, 4), np.float32)}, 2,
     r"the topk postprocessor reads \[N, C\] scores, but output 'o' has shape \[2, 3, 4\]"),
    (ArgmaxPost(label_names=("a", "b")), {"o": logits()}, 33,
     r"output 'o' has 7 classes, but the labels file has 2 labels"),
    (EmbeddingPost(output="o"), {"o": np.zeros((2, 3), np.float32)}, 2,
     r"embedding pooling 'mean' reads \[N, T, D\], but output 'o' has shape \[2, 3\]"),
    (EmbeddingPost(output="o"), {"o": np.zeros((2, 3, 4), np.float32)}, 2,
     r"attention mask 'attention_mask' has shape \[2, 5\], output 'o' \[2, 3, 4\]"),
])
def test_runtime_errors(spec: Any, outputs: dict[str, np.ndarray], rows: int, match: str) -> None:
    inputs = {"attention_mask": np.ones((2, 5), np.int64)}
    with pytest.raises(DataError, match=match):
        Postprocessor([spec])(outputs, inputs, rows)


# --- resolution ------------------------------------------------------------------------------


OUTPUTS = {m.name: m for m in (meta("logits", np.float32, None, 7),
                               meta("hidden", np.float32, None, None, 16),
                               meta("pooled", np.float16, None, 16),
                               meta("ids", np.int64, None, 7),
                               meta("dynamic", np.float32, None, None))}


def test_resolve_fills_defaults() -> None:
    assert ArgmaxPost().resolve(OUTPUTS).output == "logits"
    assert TopKPost().resolve(OUTPUTS).k == 5
    assert TopKPost(output="dynamic").resolve(OUTPUTS).k == 5
    three = {"o": meta("o", np.float32, None, 3)}
    assert TopKPost().resolve(three).k == 3
    assert RawPost().resolve(OUTPUTS).outputs == tuple(OUTPUTS)
    inputs = {"input_ids": meta("input_ids", np.int64, None, None)}
    embedding = EmbeddingPost(output="hidden").resolve(OUTPUTS, inputs)
    assert embedding.mask is None  # the model has no attention_mask: every token counts
    types = TopKPost(k=2, label_names=NAMES).column_types(OUTPUTS)
    assert types == {"topk_labels": pa.list_(pa.int32(), 2), "topk_names": pa.list_(pa.string(), 2),
                     "topk_scores": pa.list_(pa.float32(), 2)}
    assert EmbeddingPost(output="pooled", pooling="none").column_types(OUTPUTS) == {
        "embedding": pa.list_(pa.float32(), 16)}


@pytest.mark.parametrize("spec,match", [
    (ArgmaxPost(output="nope"), r"the argmax postprocessor reads output 'nope', but the model's "
                                r"outputs are \['logits', .*\]; pass --model-output"),
    (ArgmaxPost(output="hidden"), r"reads \[N, classes\] scores, but output 'hidden' is float32 "
                                  r"\[N,\?,16\]; pick a \[N, C\] output with --model-output"),
    (SigmoidPost(output="ids"), r"the sigmoid postprocessor reads float scores, but output 'ids' is "
                                r"int64 \[N,7\]"),
    (ArgmaxPost(labels="labels.txt", label_names=("a", "b")),
     r"labels file 'labels.txt' has 2 label\(s\), but output 'logits' of the model has 7 classes"),
    (TopKPost(k=8), r"topk k=8 is more than the 7 classes of output 'logits'; pass --top-k 7"),
    (EmbeddingPost(output="pooled"), r"embedding pooling 'mean' reads a \[N, T, D\] output, but "
                                     r"output 'pooled' is float16 \[N,16\]; use --pooling none"),
    (EmbeddingPost(output="hidden", pooling="none"), r"use --pooling mean or cls"),
    (RawPost(outputs=("x",)), r"the raw postprocessor names output\(s\) \['x'\]"),
    (FunctionPost(function="tests.user_functions:missing"),
     r"module 'tests.user_functions' has no attribute 'missing'"),
])
def test_resolve_errors(spec: Any, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        spec.resolve(OUTPUTS)


def test_embedding_mask_must_be_an_input_when_named() -> None:
    inputs = {"ids": meta("ids", np.int64, None, None)}
    with pytest.raises(SpecError, match=r"embedding mask input 'm' is not one of the model's inputs"):
        EmbeddingPost(output="hidden", mask="m").resolve(OUTPUTS, inputs)


@pytest.mark.parametrize("spec,match", [
    (lambda: TopKPost(k=0), "topk k must be an integer >= 1"),
    (lambda: SigmoidPost(threshold=1.5), r"sigmoid threshold must be a number in \[0, 1\]"),
    (lambda: EmbeddingPost(pooling="max"), "embedding pooling must be one of mean, cls, none"),
    (lambda: FunctionPost(function="nocolon"), "postprocess function 'nocolon' is not an import"),
])
def test_spec_errors(spec: Any, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        spec()


@pytest.mark.parametrize("text,want", [
    ("cat\ndog\n\n", ("cat", "dog")),
    ("cat\r\ndog", ("cat", "dog")),
    ('["cat", "dog"]', ("cat", "dog")),
    ('{"id2label": {"1": "dog", "0": "cat"}}', ("cat", "dog")),
    ('{"0": "cat", "1": "dog"}', ("cat", "dog")),
])
def test_parse_labels(text: str, want: tuple[str, ...]) -> None:
    assert parse_labels(text, "'l'") == want


@pytest.mark.parametrize("text,match", [
    ("", r"labels file 'l' is empty"),
    ("[oops", r"labels file 'l' looks like JSON but does not parse"),
    ('{"id2label": {"0": "a", "2": "b"}}', r"maps ids \[0, 2\]; they must be 0..1, each once"),
    ('{"id2label": {"x": "a"}}', r"maps non-integer ids"),
])
def test_parse_labels_errors(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_labels(text, "'l'")
