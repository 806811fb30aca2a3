"""Install TensorRT's real Python bindings against stub libraries: `python .ci/trt_bindings.py DEST`.

TensorRT's libraries (`tensorrt-cu1x-libs`) download from NVIDIA's own index, which CI cannot
reach; the bindings wheels (`tensorrt_cu12_bindings`, `tensorrt_cu13_bindings` and the lean
ones) come from PyPI and hold the real pybind11 modules, which need only a few entry points of
libnvinfer, libnvonnxparser and libnvinfer_plugin to load. This script installs the bindings of
TensorRT 10.13 and 11.4 (full and lean) each into DEST/NAME (with the two-line `tensorrt` /
`tensorrt_lean` package the metapackages add), and compiles stub libraries into DEST/stub whose
entry points return NULL or 0. With LD_LIBRARY_PATH=DEST/stub the real modules import: their
names, signatures and argument conversions can be checked, and their factories (Builder,
Runtime) return nothing, so nothing runs. tests/backends/test_trt_bindings.py uses them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

#: name -> (bindings requirement, bindings package, the package name users import)
SETS = {
    "trt10": ("tensorrt_cu12_bindings==10.13.0.35", "tensorrt_bindings", "tensorrt"),
    "trt11": ("tensorrt_cu13_bindings==11.4.0.106", "tensorrt_bindings", "tensorrt"),
    "lean10": ("tensorrt_lean_cu12_bindings==10.13.0.35", "tensorrt_lean_bindings", "tensorrt_lean"),
    "lean11": ("tensorrt_lean_cu13_bindings==11.4.0.106", "tensorrt_lean_bindings", "tensorrt_lean"),
}
# The entry points the bindings import (`nm -D --undefined-only` of their .so files).
STUB_C = """
#include <stddef.h>
void* createInferBuilder_INTERNAL(void* logger, int version) { return NULL; }
void* createInferRefitter_INTERNAL(void* engine, void* logger, int version) { return NULL; }
void* createInferRuntime_INTERNAL(void* logger, int version) { return NULL; }
void* createNvOnnxParserRefitter_INTERNAL(void* refitter, void* logger, int version) { return NULL; }
void* createNvOnnxParser_INTERNAL(void* network, void* logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void* getPluginRegistry(void) { return NULL; }
void* getBuilderPluginRegistry(int type) { return NULL; }
int initLibNvInferPlugins(void* logger, const char* name_space) { return 0; }
"""
LIBRARIES = ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin", "libnvinfer_lean")


def build_stubs(dest: str) -> None:
    stub = os.path.join(dest, "stub")
    os.makedirs(stub, exist_ok=True)
    source = os.path.join(stub, "stub.c")
    with open(source, "w") as f:
        f.write(STUB_C)
    for major in (10, 11):
        for lib in LIBRARIES:
            soname = f"{lib}.so.{major}"
            subprocess.run(["gcc", "-shared", "-fPIC", "-o", os.path.join(stub, soname),
                            f"-Wl,-soname,{soname}", source], check=True)


def install(dest: str, name: str) -> None:
    requirement, bindings, alias = SETS[name]
    target = os.path.join(dest, name)
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                    requirement], check=True)
    os.makedirs(os.path.join(target, alias), exist_ok=True)
    with open(os.path.join(target, alias, "__init__.py"), "w") as f:
        # What the tensorrt-cu1x / tensorrt-lean-cu1x metapackages install as `import tensorrt`.
        f.write(f"from {bindings} import *  # noqa: F403\nfrom {bindings} import __version__\n")


def main(dest: str) -> int:
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed to build the stub libraries; apt-get install gcc")
    build_stubs(dest)
    for name in SETS:
        install(dest, name)
    print(f"TensorRT bindings in {dest}: {', '.join(SETS)} (stub libraries in {dest}/stub)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DEST")
    sys.exit(main(sys.argv[1]))
