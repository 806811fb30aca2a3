"""The TensorRT-free parts of plan building: sizes, build settings, profiles, precision choices.

TensorRT's API surface is described by `TrtApi` (which flags exist); these tests choose it per
case so the TensorRT 10 and 11 paths are both exercised, without faking any TensorRT result.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import two_input_model
from workers.errors import SpecError
from workers.onnx_precision import ModelTypes, model_types
from workers.plan_build import (
    BuildConfig,
    GpuFacts,
    TrtApi,
    external_data_locations,
    parse_bytes,
    plan_precision,
    profile_shapes,
    target_key,
)
from workers.tensors import TensorMeta

TRT10 = TrtApi("10.13.0.35", precision_flags=True, strongly_typed_flag=True)
TRT11 = TrtApi("11.1.0.7", precision_flags=False, strongly_typed_flag=True)
FP32 = ModelTypes(frozenset({"fp32"}), frozenset(), False)
# An FP32 model with one FP16 tensor (its weights FP32), and one converted offline (FP16 weights).
MIXED = ModelTypes(frozenset({"fp32", "fp16"}), frozenset(), False, frozenset({"fp32"}))
FP16 = ModelTypes(frozenset({"fp32", "fp16"}), frozenset(), False, frozenset({"fp16"}))
INT8 = ModelTypes(frozenset({"fp32"}), frozenset({"int8"}), False)
FP8 = ModelTypes(frozenset({"fp32"}), frozenset({"fp8"}), False)
LOOPY = ModelTypes(frozenset({"fp32"}), frozenset(), True)


def escaped(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize(("text", "value"), [
    (4096, 4096), ("4096", 4096), ("4GiB", 4 * 1024**3), ("512MiB", 512 * 1024**2),
    ("2G", 2 * 10**9), ("1.5KiB", 1536), (" 8 kb ", 8000),
])
def test_parse_bytes(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "4x", "GiB", "-1", "0", "1e9"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(SpecError, match="workspace must be"):
        parse_bytes(text)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": "fp64"}, "precision must be one of fp32, fp16, bf16, fp8, int8, got 'fp64'"),
    ({"profiles": ()}, "a plan needs at least one optimization profile"),
    ({"profiles": ((4, 2, 8),)}, "optimization profile (4, 2, 8) must be three batch sizes "
                                 "min <= opt <= max"),
    ({"profiles": ((0, 1, 1),)}, "optimization profile (0, 1, 1) must be"),
    ({"workspace": 0}, "workspace must be a number of bytes >= 1, got 0"),
    ({"optimization_level": 6}, "optimization_level must be an integer from 0 to 5, got 6"),
    ({"optimization_level": -1}, "optimization_level must be an integer from 0 to 5, got -1"),
    ({"exclude_lean_runtime": True}, "exclude_lean_runtime only applies to version-compatible "
                                     "plans; add --version-compatible"),
    ({"precision": "fp8", "hardware_compatible": True}, "precision fp8 cannot be built "
                                                        "hardware-compatible"),
])
def test_build_config_refuses(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=escaped(message)):
        BuildConfig(**kwargs)  # type: ignore[arg-type]


def test_build_config_for_batch_and_json() -> None:
    config = BuildConfig.for_batch(64, precision="fp16", workspace=1 << 30)
    assert config.profiles == ((1, 64, 64),) and config.max_batch == 64
    assert config.to_json()["profiles"] == [[1, 64, 64]]
    assert config.to_json()["workspace"] == 1 << 30
    hash(config)  # frozen: crosses to a Ray task as a value


def test_target_key() -> None:
    assert target_key((8, 6), False) == "sm_86"
    assert target_key((9, 0), False) == "sm_90"
    assert target_key((9, 0), True) == "ampere_plus"
    # One plan per device model: A10 and A40 are both 8.6, H100 and H200 both 9.0.
    assert target_key((8, 6), False, "NVIDIA A10") == "sm_86-nvidia-a10"
    assert target_key((8, 6), False, "NVIDIA A40") == "sm_86-nvidia-a40"
    assert (target_key((9, 0), False, "NVIDIA H100 80GB HBM3")
            != target_key((9, 0), False, "NVIDIA H200"))
    assert target_key((9, 0), True, "NVIDIA H200") == "ampere_plus"  # shared across models


# Profiles ------------------------------------------------------------------------------------
def meta(name: str, *shape: int | None) -> TensorMeta:
    return TensorMeta(name, np.dtype(np.float32), tuple(shape))


def test_profiles_for_dynamic_batch() -> None:
    config = BuildConfig(profiles=((1, 32, 64), (64, 128, 128)))
    shapes = profile_shapes([meta("image", None, 3, 4, 4), meta("meta", None, 8)], config)
    assert shapes == [
        {"image": ((1, 3, 4, 4), (32, 3, 4, 4), (64, 3, 4, 4)), "meta": ((1, 8), (32, 8), (64, 8))},
        {"image": ((64, 3, 4, 4), (128, 3, 4, 4), (128, 3, 4, 4)),
         "meta": ((64, 8), (128, 8), (128, 8))},
    ]


def test_static_model_needs_no_profile_when_its_batch_is_the_batch_size() -> None:
    assert profile_shapes([meta("x", 16, 8)], BuildConfig.for_batch(16)) == []


def test_fixed_batch_smaller_than_batch_size_is_refused() -> None:
    with pytest.raises(SpecError, match=escaped(
            "model input 'x' has a fixed batch dimension of 1 (float32 [1,3,224,224]), but the "
            "plan is built for batches of up to 256 rows; export the model with a dynamic batch "
            "dimension (torch.onnx.export(..., dynamic_axes={'x': {0: 'N'}})) or set the batch "
            "size to 1")):
        profile_shapes([meta("x", 1, 3, 224, 224)], BuildConfig.for_batch(256))


def test_dynamic_dims_beyond_the_batch_are_refused() -> None:
    with pytest.raises(SpecError, match=escaped(
            "model input 'x' is float32 [N,3,?,?]: dimensions beyond the batch are dynamic")):
        profile_shapes([meta("x", None, 3, None, None)], BuildConfig())


def test_token_widths_take_a_range_per_profile() -> None:
    config = BuildConfig(profiles=((1, 256, 256), (1, 128, 256)), lengths=((1, 24, 32),
                                                                          (33, 64, 128)))
    ids = TensorMeta("input_ids", np.dtype(np.int64), (None, None))
    assert profile_shapes([ids], config) == [
        {"input_ids": ((1, 1), (256, 24), (256, 32))},
        {"input_ids": ((1, 33), (128, 64), (256, 128))}]
    assert config.to_json()["lengths"] == [[1, 24, 32], [33, 64, 128]]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"profiles": ((1, 8, 8),), "lengths": ((1, 8, 8), (9, 9, 9))},
     "2 token-length profile(s) for 1 batch profile(s); give one of each per optimization"),
    ({"profiles": ((1, 8, 8),), "lengths": ((9, 8, 8),)},
     "optimization profile (9, 8, 8) must be three token widths min <= opt <= max"),
])
def test_token_width_profiles_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=escaped(match)):
        BuildConfig(**kwargs)  # type: ignore[arg-type]


def test_pick_profile_prefers_the_current_one_and_says_when_none_holds() -> None:
    from workers.backends.tensorrt import pick_profile

    ranges = [{"ids": ((1, 1), (256, 32))}, {"ids": ((1, 33), (256, 128))}]
    assert pick_profile(ranges, {"ids": (200, 24)}) == 0
    assert pick_profile(ranges, {"ids": (10, 100)}) == 1
    assert pick_profile(ranges, {"ids": (10, 20)}, prefer=1) == 0
    overlapping = [{"ids": ((1, 1), (256, 64))}, {"ids": ((1, 1), (256, 128))}]
    assert pick_profile(overlapping, {"ids": (10, 20)}, prefer=1) == 1  # no needless switch
    assert pick_profile(ranges, {"ids": (300, 20)}) is None
    assert pick_profile([], {"ids": (1, 1)}) is None


# Precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("precision", "api", "types", "strongly", "flags", "convert"), [
    ("fp32", TRT10, FP32, False, (), None),       # classic FP32 build
    ("fp32", TRT11, FP32, True, (), None),        # 11: always strongly typed
    ("fp32", TRT10, FP16, True, (), None),        # the model's own fp16 tensors are kept
    ("fp16", TRT10, FP32, False, ("FP16",), None),  # 10: weakly typed with the flag
    ("bf16", TRT10, FP32, False, ("BF16",), None),
    ("fp16", TRT11, FP32, True, (), "fp16"),      # 11: no flags, convert before parsing
    ("bf16", TRT11, FP32, True, (), "bf16"),
    ("fp16", TRT11, FP16, True, (), None),        # the model computes in fp16 already
    ("fp16", TRT10, FP16, True, (), None),
    ("fp16", TRT10, MIXED, False, ("FP16",), None),  # one fp16 tensor: still lowered
    ("fp16", TRT11, MIXED, True, (), "fp16"),
    ("int8", TRT10, INT8, True, (), None),        # explicit quantization, both versions
    ("int8", TRT11, INT8, True, (), None),
    ("fp8", TRT11, FP8, True, (), None),
])
def test_precision_paths(precision: str, api: TrtApi, types: ModelTypes, strongly: bool,
                         flags: tuple[str, ...], convert: str | None) -> None:
    plan = plan_precision(precision, api, types, capability=(9, 0))
    assert (plan.strongly_typed, plan.flags, plan.convert_to) == (strongly, flags, convert)
    assert plan.how
    assert plan.clear_tf32 == (precision == "fp32")


@pytest.mark.parametrize(("precision", "types", "capability", "hardware", "message"), [
    ("int8", FP32, (9, 0), False,
     "precision int8 needs a model with explicit quantization (QuantizeLinear/DequantizeLinear "
     "nodes producing int8), and model has none; quantize it with NVIDIA ModelOpt"),
    ("fp8", INT8, (9, 0), False,
     "precision fp8 needs a model with explicit quantization (QuantizeLinear/DequantizeLinear "
     "nodes producing fp8), and model has none (it has int8 Q/DQ nodes)"),
    ("fp8", FP8, (8, 0), False, "precision fp8 needs compute capability 8.9+ (Ada or Hopper), "
                                "and this GPU is 8.0; use --precision int8 or fp16"),
    ("bf16", FP32, (7, 5), False, "precision bf16 needs compute capability 8.0+ (Ampere or "
                                  "newer), and this GPU is 7.5; use --precision fp16"),
    ("fp16", FP32, (7, 5), True, "hardware-compatible plans (AMPERE_PLUS) need an Ampere or "
                                 "newer GPU (compute capability 8.0+), and this one is 7.5"),
])
def test_precision_that_cannot_be_honoured(precision: str, types: ModelTypes,
                                           capability: tuple[int, int], hardware: bool,
                                           message: str) -> None:
    for api in (TRT10, TRT11):
        with pytest.raises(SpecError, match=escaped(message)):
            plan_precision(precision, api, types, capability, hardware)


def test_trt11_low_precision_with_subgraphs_names_modelopt() -> None:
    with pytest.raises(SpecError, match=escaped(
            "TensorRT 11.1.0.7 has no fp16 builder flag (strong typing only), so the model must "
            "carry fp16 types, and model has control-flow subgraphs the built-in conversion does "
            "not rewrite; convert it with NVIDIA ModelOpt (python -m modelopt.onnx.autocast "
            "--onnx_path MODEL.onnx --low_precision_type fp16)")):
        plan_precision("fp16", TRT11, LOOPY, (9, 0))
    # TensorRT 10 still has the flag: no conversion needed, so subgraphs are fine.
    assert plan_precision("fp16", TRT10, LOOPY, (9, 0)).flags == ("FP16",)


def test_api_probe_reads_what_the_module_has() -> None:
    with_flags = SimpleNamespace(__version__="10.13.0.35",
                                 BuilderFlag=SimpleNamespace(FP16=0, INT8=1),
                                 NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    without = SimpleNamespace(__version__="11.0.0.1", BuilderFlag=SimpleNamespace(TF32=6),
                              NetworkDefinitionCreationFlag=SimpleNamespace())
    assert TrtApi.probe(with_flags) == TRT10
    probed = TrtApi.probe(without)
    assert (probed.major, probed.precision_flags, probed.strongly_typed_flag) == (11, False, False)


def test_gpu_facts_api_and_text() -> None:
    facts = GpuFacts(capability=(8, 6), tensorrt="11.0.0.1", precision_flags=False)
    assert facts.capability_text == "8.6"
    assert facts.api.major == 11 and not facts.api.precision_flags


def test_precision_says_what_is_built() -> None:
    assert plan_precision("fp16", TRT10, MIXED).how == (
        "BuilderFlag.FP16 over the fp32 model (weakly typed: TensorRT picks fp16 or fp32 per "
        "layer) (the model carries some fp16 tensors, and its fp32 weights are lowered too)")
    assert plan_precision("fp16", TRT10, FP16).how == (
        "the model's own fp16 weights and types (strongly typed)")
    assert plan_precision("bf16", TRT11, FP32).how.startswith(
        "model converted to bf16 before parsing (I/O kept fp32, reductions, Pow, Exp, Softmax "
        "and norms in fp32; TensorRT 11.1.0.7 has no precision flags)")


def test_model_types_feed_the_precision_choice() -> None:
    assert not model_types(two_input_model()).carries("fp16")
    assert plan_precision("fp16", TRT11, model_types(two_input_model())).convert_to == "fp16"


# External weights ----------------------------------------------------------------------------
def test_external_data_locations(tmp_path: Path) -> None:
    model = onnx.load_model_from_string(two_input_model())
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert external_data_locations(path.read_bytes()) == ["weights.bin"]
    assert external_data_locations(two_input_model()) == []


def test_external_data_outside_the_model_directory_is_refused() -> None:
    weights = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    weights.data_location = TensorProto.EXTERNAL
    del weights.float_data[:]
    weights.ClearField("raw_data")
    entry = weights.external_data.add()
    entry.key, entry.value = "location", "../secrets.bin"
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
                              [weights])
    data = helper.make_model(graph).SerializeToString()
    with pytest.raises(SpecError, match=escaped("model keeps tensor 'w' (initializer 'w') in "
                                                "the external file '../secrets.bin', which "
                                                "leaves the model's directory")):
        external_data_locations(data)
