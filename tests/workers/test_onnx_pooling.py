"""Pooling appended to an ONNX graph gives the host's pooling of the original output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from examples.reviews import encoder_model
from workers.onnx_pooling import PooledModel, pool_in_graph
from workers.postprocess import mean_pool

VOCAB = 300


def run(model: bytes, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted}),
                    strict=True))


def random_batch(rng: np.random.Generator, rows: int, tokens: int) -> dict[str, np.ndarray]:
    lengths = rng.integers(1, tokens + 1, rows)
    lengths[0] = 0  # a row with nothing under its mask: zeros, as on the host
    mask = (np.arange(tokens) < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, VOCAB, (rows, tokens)), "attention_mask": mask,
            "token_type_ids": np.zeros((rows, tokens), np.int64)}


def pooled(result: PooledModel | str) -> PooledModel:
    assert isinstance(result, PooledModel), result
    return result


@pytest.fixture(scope="module")
def encoder() -> bytes:
    return encoder_model(VOCAB, seed=3).SerializeToString()


@pytest.mark.parametrize("pooling,mask", [("mean", "attention_mask"), ("mean", None),
                                          ("cls", None)])
def test_the_graph_pools_as_the_host_does(encoder: bytes, pooling: str, mask: str | None) -> None:
    rng = np.random.default_rng()
    batch = random_batch(rng, 9, 13)
    hidden = run(encoder, batch)["last_hidden_state"]
    want = (hidden[:, 0] if pooling == "cls"
            else mean_pool(hidden, batch["attention_mask"] if mask else None))
    result = pooled(pool_in_graph(encoder, "last_hidden_state", pooling, mask))
    got = run(result.model_bytes, batch)
    assert list(got) == ["last_hidden_state_pooled"]
    assert got["last_hidden_state_pooled"].dtype == np.float32
    np.testing.assert_allclose(got["last_hidden_state_pooled"], want, rtol=1e-5, atol=1e-6)
    out = onnx.load_model_from_string(result.model_bytes).graph.output[0]
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == ["batch", 64]


def tiny_model(opset: int, hidden_type: int = TensorProto.FLOAT16) -> bytes:
    """x [N, T, 4] -> h (x cast to `hidden_type`), beside a second output; one opset."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=hidden_type),
         helper.make_node("Identity", ["x"], ["other"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "t", 4]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "t"])],
        [helper.make_tensor_value_info("h", hidden_type, ["n", "t", 4]),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", "t", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("pooling,mask", [("mean", "attention_mask"), ("mean", None),
                                          ("cls", None)])
def test_each_opset_gets_its_form_of_axes(opset: int, pooling: str, mask: str | None) -> None:
    """fp16 hidden states (a model that carries fp16) pool in float32, as on the host."""
    rng = np.random.default_rng()
    # Values whose fp16 sum over the tokens would overflow: the pooling must not run in fp16.
    x = rng.uniform(-6e4, 6e4, (6, 5, 4)).astype(np.float32)
    attention = (rng.random((6, 5)) < 0.7).astype(np.int64)
    result = pooled(pool_in_graph(tiny_model(opset), "h", pooling, mask))
    got = run(result.model_bytes, {"x": x, "attention_mask": attention})
    assert list(got) == ["h_pooled"]  # 'other' is read by nothing: dropped
    assert got["h_pooled"].dtype == np.float32
    h = x.astype(np.float16).astype(np.float32)
    want = h[:, 0] if pooling == "cls" else mean_pool(h, attention if mask else None)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got["h_pooled"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_low_precision_conversion_leaves_the_pooling_in_float32(
        encoder: bytes, precision: str) -> None:
    """A plan build converts the model to fp16/bf16 (I/O kept fp32): the appended sums stay
    float32, so graph pooling equals host pooling of the converted model's hidden states."""
    from workers.onnx_precision import FP32_NODES_KEY, convert_float

    result = pooled(pool_in_graph(encoder, "last_hidden_state", "mean", "attention_mask"))
    model = onnx.load_model_from_string(result.model_bytes)
    kept = next(p.value for p in model.metadata_props if p.key == FP32_NODES_KEY).split(",")
    assert kept == [n.name for n in model.graph.node if n.name.startswith("pool/")]
    converted = onnx.load_model_from_string(convert_float(result.model_bytes, precision))
    # Every float the appended nodes make is float32 (float Constants became initializers).
    inferred = onnx.shape_inference.infer_shapes(converted, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info,
                                                            *inferred.output]}
    made = [out for n in converted.graph.node if n.name in kept for out in n.output]
    assert {"pool/Mul", "pool/ReduceSum", "pool/Div"} <= {n.name.rsplit("_node", 1)[0] for n in
                                                           converted.graph.node if n.name in kept}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    assert {types[out] for out in made} & floats == {TensorProto.FLOAT}, made
    assert [o.name for o in converted.graph.output] == ["last_hidden_state_pooled"]
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    if precision == "bf16":
        return  # ONNX Runtime's CPU provider lacks bfloat16 kernels for the encoder's ops
    batch = random_batch(np.random.default_rng(), 9, 40)
    hidden = run(convert_float(encoder, precision), batch)["last_hidden_state"]
    got = run(converted.SerializeToString(), batch)["last_hidden_state_pooled"]
    np.testing.assert_allclose(got, mean_pool(hidden, batch["attention_mask"]),
                               rtol=1e-6, atol=1e-6)


def test_outputs_named_in_keep_stay_in_order() -> None:
    result = pooled(pool_in_graph(tiny_model(13, TensorProto.FLOAT), "h", "cls", None,
                                  keep={"other"}))
    outputs = [o.name for o in onnx.load_model_from_string(result.model_bytes).graph.output]
    assert outputs == ["h_pooled", "other"]


def test_the_rewrite_gives_the_same_bytes_every_time(encoder: bytes) -> None:
    """The rewritten bytes are the job's identity and the plan's key: a rerun must match."""
    first = pooled(pool_in_graph(encoder, "last_hidden_state", "mean", "attention_mask"))
    again = pooled(pool_in_graph(encoder, "last_hidden_state", "mean", "attention_mask"))
    assert first.model_bytes == again.model_bytes


def test_a_taken_name_gets_a_suffix() -> None:
    model = onnx.load_model_from_string(tiny_model(13))
    model.graph.node.append(helper.make_node("Identity", ["x"], ["h_pooled"]))
    result = pooled(pool_in_graph(model.SerializeToString(), "h", "mean", None))
    assert result.output == "h_pooled_1"


def test_models_the_graph_cannot_pool_say_why(encoder: bytes, tmp_path: Path) -> None:
    assert pool_in_graph(encoder, "pooler_output", "mean", None) == \
        "output 'pooler_output' has rank 2, not 3 ([N, T, D])"
    assert pool_in_graph(encoder, "last_hidden_state", "mean", "mask") == \
        "the attention mask 'mask' is not an input of the graph"
    assert pool_in_graph(encoder, "nope", "cls", None) == "'nope' is not an output of the graph"
    assert pool_in_graph(encoder, "last_hidden_state", "cls", None,
                         keep={"last_hidden_state"}) == \
        "another postprocessor reads output 'last_hidden_state' as it is"
    assert pool_in_graph(tiny_model(7), "h", "mean", None) == \
        "the model's opset 7 is older than 8"
    assert pool_in_graph(tiny_model(13, TensorProto.INT32), "h", "mean", None) == \
        "output 'h' is not a float tensor"
    path = tmp_path / "m.onnx"
    onnx.save(onnx.load_model_from_string(encoder), str(path), save_as_external_data=True,
              location="w.bin")
    assert pool_in_graph(path.read_bytes(), "last_hidden_state", "mean", "attention_mask") == \
        "the model keeps tensors in external data files"
