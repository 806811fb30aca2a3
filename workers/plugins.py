"""Plugin libraries (`--plugins LIB`): TensorRT plugins and ONNX Runtime custom-op libraries.

A library is named by a local path (the same on every node) or any fsspec URI. The driver reads
each once and records its sha256 (`digest_plugins`); the build task and every actor then get a
local file for it (`local_plugin_files`: a local path in place, anything else fetched into a
private 0700 directory of the process) and check that the bytes are those the driver hashed, so
the library loaded is the one in the plan's fingerprint. TensorRT registers them with
`get_plugin_registry().load_library` after `init_libnvinfer_plugins` (its standard plugins,
such as EfficientNMS_TRT), before a network is parsed or a plan deserialized; ONNX Runtime with
`SessionOptions.register_custom_ops_library`. Loading a library runs its code: pass only
libraries you trust, as any native code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from workers.errors import BackendError, SpecError, StorageError
from workers.storage import filesystem, is_local, read_bytes

#: (uri, sha256) per library, in the order given
Plugins = tuple[tuple[str, str], ...]


def digest_plugins(uris: Sequence[str], storage_options: Mapping[str, Any] | None = None
                   ) -> Plugins:
    """Each library's URI and the sha256 of its bytes; a library that cannot be read is refused."""
    out = []
    for uri in uris:
        try:
            data = read_bytes(uri, storage_options)
        except StorageError as exc:
            raise SpecError(f"plugin library '{uri}' cannot be read ({exc}); check --plugins "
                            "(a local path must exist on the driver and on every node)") from exc
        out.append((uri, hashlib.sha256(data).hexdigest()))
    return tuple(out)


def _is_local(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[bool, str]:
    fs, path = filesystem(uri, storage_options)
    return is_local(fs), str(path)


def local_plugin_files(plugins: Plugins,
                       storage_options: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
                       directory: str | None = None) -> list[str]:
    """A local file for each library, its bytes checked against the driver's sha256.

    Remote libraries are written into `directory` (default: a new private one), which the
    caller owns; local ones are used in place. `storage_options` may be frozen, as specs and
    backend configs carry them.
    """
    storage_options = dict(storage_options or ())
    paths = []
    for uri, sha in plugins:
        local, path = _is_local(uri, storage_options)
        try:
            data = read_bytes(uri, storage_options)
        except StorageError as exc:
            raise BackendError(f"plugin library '{uri}' cannot be read on this node ({exc}); a "
                               "local path must exist on every node, or pass a URI every node "
                               "can read") from exc
        found = hashlib.sha256(data).hexdigest()
        if sha and found != sha:
            raise BackendError(f"plugin library '{uri}' changed since the job started (sha256 "
                               f"{found[:12]} on this node, {sha[:12]} when the driver read it); "
                               "the same library must be on every node: rerun the job")
        if not local:
            if directory is None:
                directory = tempfile.mkdtemp(prefix="trt-plugins-")  # mode 0700
            path = os.path.join(directory, f"{found[:16]}-{os.path.basename(path) or 'plugin.so'}")
            with open(path, "wb") as f:
                f.write(data)
        paths.append(path)
    return paths


# (TensorRT module, library sha256) -> handle: TensorRT's registry is one per process and
# `load_library` returns NULL for a library whose plugins are already registered, so a library
# loads once per process however many builds and backends use it.
_loaded: dict[tuple[str, str], Any] = {}
_loaded_lock = threading.Lock()


def register_tensorrt_plugins(trt_module: Any, trt_logger: Any, paths: Sequence[str]) -> list[Any]:
    """TensorRT's standard plugins, then each library of `paths`; returns the library handles.

    The lean and dispatch runtimes have no `init_libnvinfer_plugins` (their plans carry what
    they need); libraries load into the registry there too. A library this process loaded
    before (the same bytes) is not loaded again.
    """
    init = getattr(trt_module, "init_libnvinfer_plugins", None)
    if init is not None:
        # True unless libnvinfer_plugin failed to load; a build then says which op it lacks.
        init(trt_logger, "")
    if not paths:
        return []
    registry = trt_module.get_plugin_registry()
    if registry is None:
        raise BackendError(f"{trt_module.__name__} has no plugin registry here; the plugin "
                           "libraries cannot be loaded")
    handles = []
    with _loaded_lock:
        for path in paths:
            with open(path, "rb") as f:
                key = (trt_module.__name__, hashlib.sha256(f.read()).hexdigest())
            if key not in _loaded:
                handle = registry.load_library(path)
                if handle is None:
                    raise BackendError(
                        f"TensorRT could not load plugin library '{path}' (not a TensorRT plugin "
                        "library for this TensorRT version, its dependencies are missing, or its "
                        "plugins are registered already by another library); check --plugins")
                _loaded[key] = handle
            handles.append(_loaded[key])
    return handles
