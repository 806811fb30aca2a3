"""GPU image decoding: nvImageCodec decodes encoded images into device memory, and one kernel
resizes, center-crops, normalizes and lays them out straight into a device slot's input buffer.

The host ships encoded bytes (about 20 kB a JPEG) instead of decoded pixels (150 kB at 224 px,
600 kB as float32), and the node's CPUs stay free for reading and writing.

- `GpuImages.decode` (the converting thread) decodes a batch with nvImageCodec into device
  memory and waits for it; rows the GPU cannot decode (formats it has no GPU decoder for, say)
  are decoded on the CPU (`workers.images.load_image`), so a corrupt image fails exactly as on
  the CPU path: same reason, same `on_error`. It returns one object per row: a decoded device
  image or the CPU's pixels, in a numpy object array, which batching slices like any input.
- `GpuImages.fill` (the GPU loop, `workers.slots.run_slots`) launches the fit kernel for a
  batch on the slot's stream, writing the slot's device input buffer, so the slot skips that
  input's host copy.

The kernel computes what the CPU path computes: Pillow's bilinear resize of the shorter side
(a triangle filter widened by the scale when shrinking, as Pillow's is), the center crop, Pillow's
RGB-to-L conversion for one-channel models, rounding to uint8, then `(x / 255 - mean) / std` in
the input's dtype and layout. It is compiled at run time with NVRTC and launched through
cuda-python's driver API (`cuda.bindings`), the layer `workers.cuda` uses. CV-CUDA's fused
`resize_crop_convert_reformat` was the library candidate; it was not used: its linear filter does
not widen when shrinking (so it would not match the CPU path's pixels), and its wheel (128 MB)
weighs more than everything else the GPU path installs. `fit_reference` is the same arithmetic in
numpy, which the CPU tests compare with Pillow.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.errors import BackendError, MissingDependencyError
from workers.images import (
    FAST_THREADS,
    ImageDecoder,
    check_pixels,
    crop_origin,
    dct_factor,
    import_simplejpeg,
    is_jpeg,
    jpeg_complete,
    jpeg_size,
    resized_size,
)

#: One row of a batch for the kernel: where its source pixels are and how it maps to the crop.
ROW = np.dtype({"names": ["src", "src_h", "src_w", "pitch", "src_c", "new_h", "new_w", "top",
                          "left"],
                "formats": [np.uint64] + [np.int32] * 8,
                "offsets": [0, 8, 12, 16, 20, 24, 28, 32, 36], "itemsize": 40})

#: Output dtypes the kernel writes (the model input's), by kernel name.
KERNELS = {np.dtype(np.uint8): "fit_u8", np.dtype(np.float16): "fit_f16",
           np.dtype(np.float32): "fit_f32", np.dtype(np.float64): "fit_f64"}

KERNEL_SOURCE = r"""
struct Row {
    unsigned long long src;
    int src_h, src_w, pitch, src_c;
    int new_h, new_w, top, left;
};

__device__ __forceinline__ float tri(float x) {
    x = fabsf(x);
    return x < 1.0f ? 1.0f - x : 0.0f;
}

// Pillow's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
__device__ __forceinline__ float luma(const unsigned char* p) {
    unsigned int v = p[0] * 19595u + p[1] * 38470u + p[2] * 7471u + 0x8000u;
    return (float)(v >> 16);
}

__device__ __forceinline__ void put(unsigned char* o, float v, float s, float t) {
    *o = (unsigned char)v;
}
__device__ __forceinline__ void put(float* o, float v, float s, float t) { *o = v * s + t; }
__device__ __forceinline__ void put(double* o, float v, float s, float t) {
    *o = (double)v * (double)s + (double)t;
}
__device__ __forceinline__ void put(unsigned short* o, float v, float s, float t) {
    float f = v * s + t;
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    *o = h;
}

// One thread per output pixel of one row (blockIdx.y): Pillow's bilinear filter over the
// source pixels the pixel's footprint covers, both axes at once, normalized like Pillow's.
template <typename T>
__device__ void fit(const Row* rows, T* out, int out_h, int out_w, int out_c, int nchw,
                    float s0, float s1, float s2, float t0, float t1, float t2) {
    int n = blockIdx.y;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= out_h * out_w) return;
    int y = idx / out_w, x = idx - (idx / out_w) * out_w;
    Row r = rows[n];
    const unsigned char* src = (const unsigned char*)r.src;
    float sx = (float)r.src_w / (float)r.new_w, sy = (float)r.src_h / (float)r.new_h;
    float fx = fmaxf(sx, 1.0f), fy = fmaxf(sy, 1.0f);
    float cx = ((float)(x + r.left) + 0.5f) * sx, cy = ((float)(y + r.top) + 0.5f) * sy;
    int x0 = max((int)(cx - fx + 0.5f), 0), x1 = min((int)(cx + fx + 0.5f), r.src_w);
    int y0 = max((int)(cy - fy + 0.5f), 0), y1 = min((int)(cy + fy + 0.5f), r.src_h);
    float wx_sum = 0.0f, wy_sum = 0.0f;
    for (int i = x0; i < x1; ++i) wx_sum += tri(((float)i - cx + 0.5f) / fx);
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
    for (int j = y0; j < y1; ++j) {
        float wy = tri(((float)j - cy + 0.5f) / fy);
        wy_sum += wy;
        if (wy == 0.0f) continue;
        const unsigned char* line = src + (size_t)j * (size_t)r.pitch;
        float b0 = 0.0f, b1 = 0.0f, b2 = 0.0f;
        for (int i = x0; i < x1; ++i) {
            float wx = tri(((float)i - cx + 0.5f) / fx);
            const unsigned char* p = line + (size_t)i * (size_t)r.src_c;
            if (out_c == 1) {
                b0 += wx * (r.src_c == 1 ? (float)p[0] : luma(p));
            } else {
                b0 += wx * (float)p[0];
                b1 += wx * (float)p[1];
                b2 += wx * (float)p[2];
            }
        }
        a0 += wy * b0; a1 += wy * b1; a2 += wy * b2;
    }
    float norm = 1.0f / (wx_sum * wy_sum);
    float acc[3] = {a0 * norm, a1 * norm, a2 * norm};
    float scale[3] = {s0, s1, s2}, shift[3] = {t0, t1, t2};
    for (int c = 0; c < out_c; ++c) {
        float v = fminf(fmaxf(rintf(acc[c]), 0.0f), 255.0f);
        size_t at = nchw ? (((size_t)n * out_c + c) * out_h + y) * out_w + x
                         : (((size_t)n * out_h + y) * out_w + x) * out_c + c;
        put(out + at, v, scale[c], shift[c]);
    }
}

#define FIT(name, T) \
extern "C" __global__ void name(const Row* rows, T* out, int out_h, int out_w, int out_c, \
                                int nchw, float s0, float s1, float s2, float t0, float t1, \
                                float t2) { \
    fit<T>(rows, out, out_h, out_w, out_c, nchw, s0, s1, s2, t0, t1, t2); \
}
FIT(fit_u8, unsigned char)
FIT(fit_f16, unsigned short)
FIT(fit_f32, float)
FIT(fit_f64, double)
"""

#: Threads per block of the fit kernel (one per output pixel).
BLOCK = 256
#: Device memory of decoded images kept for the decoder to reuse (the rest are freed), and
#: pinned host memory kept for the CPU's decodes (`HostArenas`).
SPARE_BYTES = 1 << 30
#: How a `GpuImages` decodes (its `decoder`).
DECODERS = ("nvimgcodec", "turbo")


def fit_row(width: int, height: int, size: tuple[int, int], resize: int
            ) -> tuple[int, int, int, int]:
    """`(new_h, new_w, top, left)` of a kernel row for a `width` x `height` image decoded whole."""
    new_w, new_h = resized_size(width, height, resize)
    left, top = crop_origin(new_w, new_h, size)
    return new_h, new_w, top, left


def _weights(center: Any, scale: float, size: int) -> tuple[int, np.ndarray]:
    """Pillow's bilinear (triangle) taps for one output coordinate: first index, weights."""
    filterscale = max(scale, 1.0)
    lo = max(int(np.float32(center - filterscale + 0.5)), 0)
    hi = min(int(np.float32(center + filterscale + 0.5)), size)
    taps = (np.arange(lo, hi, dtype=np.float32) - np.float32(center) + np.float32(0.5)) \
        / np.float32(filterscale)
    return lo, np.clip(1.0 - np.abs(taps), 0.0, None).astype(np.float32)


def fit_reference(src: np.ndarray, new_h: int, new_w: int, top: int, left: int,
                  size: tuple[int, int], channels: int) -> np.ndarray:
    """The fit kernel's arithmetic in numpy: uint8 `[h, w, channels]` from uint8 `src` `[H, W, C]`.

    For tests: `fit_reference` against Pillow is the CPU check of what the kernel computes.
    """
    out_h, out_w = size
    src_h, src_w, src_c = src.shape
    sx, sy = np.float32(src_w) / np.float32(new_w), np.float32(src_h) / np.float32(new_h)
    if channels == 1 and src_c == 3:
        wide = src.astype(np.uint32)
        plane = ((wide[..., 0] * 19595 + wide[..., 1] * 38470 + wide[..., 2] * 7471 + 0x8000)
                 >> 16).astype(np.float32)[..., None]
    else:
        plane = src.astype(np.float32)
    out = np.empty((out_h, out_w, channels), np.uint8)
    columns = [_weights((np.float32(x + left) + np.float32(0.5)) * sx, float(sx), src_w)
               for x in range(out_w)]
    for y in range(out_h):
        y0, wy = _weights((np.float32(y + top) + np.float32(0.5)) * sy, float(sy), src_h)
        band = np.tensordot(wy, plane[y0:y0 + len(wy)], axes=(0, 0))  # [W, C]
        for x, (x0, wx) in enumerate(columns):
            acc = np.tensordot(wx, band[x0:x0 + len(wx)], axes=(0, 0)) / (wx.sum() * wy.sum())
            out[y, x] = np.clip(np.rint(acc[:channels]), 0, 255)
    return out


def import_nvimgcodec() -> Any:
    """nvImageCodec's Python module; MissingDependencyError naming the install when absent."""
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        raise MissingDependencyError(
            "--image-decode gpu needs nvImageCodec; pip install '.[gpu]' (nvidia-nvimgcodec-cu13), "
            "or pass --image-decode cpu") from exc
    return nvimgcodec


@dataclass(frozen=True)
class FitTarget:
    """What one model input wants from its images (a resolved image preprocessor's settings)."""

    input: str
    mode: str
    size: tuple[int, int]
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str
    dtype: np.dtype
    max_pixels: int | None
    #: `decode: auto`: JPEGs at the model's size may decode on the CPU (`GpuImages.decode`);
    #: `decode: gpu` asks for the GPU, and gets it.
    cpu_at_size: bool = False
    #: A JPEG larger than needed decodes at a reduced DCT scale (the preprocessor's `draft`).
    draft: bool = True

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def affine(self) -> tuple[list[float], list[float]]:
        """Per-channel scale and shift (`x * scale + shift`), padded to 3; raw for integers."""
        if self.dtype.kind != "f":
            return [1.0] * 3, [0.0] * 3
        scale = [1.0 / (s * 255.0) for s in self.std]
        shift = [-m / s for m, s in zip(self.mean, self.std, strict=True)]
        return scale + [1.0] * (3 - len(scale)), shift + [0.0] * (3 - len(shift))


class _DecodeResources:
    """The decoder and its stream, freed when the last holder lets go: `GpuImages` and every
    image it decoded. An image's memory is freed on the stream it was decoded on, so neither
    may go before the images do (a second decoder in one process crashed inside nvImageCodec
    after the first one's stream was destroyed under images still alive)."""

    def __init__(self, decoder: Any, stream: Any) -> None:
        self.decoder, self.stream = decoder, stream

    def __del__(self) -> None:
        self.decoder = None
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # interpreter exit: CUDA may be gone
                stream.synchronize()
                stream.close()


class DeviceImage:
    """One decoded image in device memory (nvImageCodec's), HWC uint8; holds it (and the
    decoder's resources, `owner`) alive."""

    __slots__ = ("height", "image", "owner", "pitch", "ptr", "width")

    def __init__(self, image: Any, owner: Any = None) -> None:
        face = image.__cuda_array_interface__
        self.image = image
        self.owner = owner
        self.ptr = int(face["data"][0])
        self.height, self.width, channels = (int(d) for d in face["shape"])
        strides = face.get("strides")
        self.pitch = int(strides[0]) if strides else self.width * channels
        if channels != 3 or face["typestr"] != "|u1":
            raise BackendError(f"nvImageCodec returned {face['typestr']} with {channels} "
                               "channels for an RGB decode; expected uint8 RGB")


class HostImage:
    """One JPEG decoded by libjpeg-turbo on a CPU thread, HWC uint8 RGB, in a pinned `arena`
    at `offset`: the fit kernel resizes it on the GPU after one copy. `width` x `height` is the
    decode (a power-of-two DCT scale of the original); `original` the stored image's size."""

    __slots__ = ("arena", "height", "offset", "original", "width")

    def __init__(self, arena: Any, offset: int, height: int, width: int,
                 original: tuple[int, int]) -> None:
        self.arena, self.offset, self.height, self.width = arena, offset, height, width
        self.original = original

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3

    def pixels(self) -> np.ndarray:
        """The decoded pixels (a view of the arena)."""
        return self.arena.view(np.uint8, (self.arena.nbytes,))[
            self.offset:self.offset + self.nbytes].reshape(self.height, self.width, 3)


class _Arena:
    """A pinned buffer lent by `HostArenas`; it goes back when the last image in it is gone."""

    def __init__(self, buffer: Any, pool: HostArenas) -> None:
        self.buffer, self.pool = buffer, pool
        self.ptr, self.nbytes = int(buffer.ptr), int(buffer.nbytes)

    def view(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return self.buffer.view(dtype, shape)

    def __del__(self) -> None:
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            self.pool.give(buffer)


class HostArenas:
    """Pinned host memory for the images one `GpuImages.decode` call decodes on the CPU:
    libjpeg-turbo writes into it, and the slot's stream copies from it to the device with no
    copy in between. Spent buffers are kept (up to `SPARE_BYTES`) for the next calls: pinning
    memory is slow. `allocate(nbytes)` makes a buffer (`workers.cuda.PinnedBuffer` on a GPU)."""

    #: Buffers are made in steps of this many bytes, so batches of nearly one size share them.
    STEP = 8 << 20

    def __init__(self, allocate: Callable[[int], Any] | None = None) -> None:
        if allocate is None:
            from workers import cuda

            allocate = cuda.PinnedBuffer
        self._allocate = allocate
        self._lock = threading.RLock()  # `give` may run from a collection inside `take`
        self._free: list[Any] = []
        self._closed = False
        #: Buffers pinned and freed so far, the seconds pinning took, and the bytes lent out
        #: now and at most: a job whose batches in flight outgrow the spares pins again and
        #: again (`stats`, in the worker's manifest entry).
        self.allocated = 0
        self.freed = 0
        self.allocate_seconds = 0.0
        self.lent_bytes = 0
        self.peak_lent_bytes = 0

    def take(self, nbytes: int) -> _Arena:
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            buffer = min(fits, key=lambda b: b.nbytes) if fits else None
            if buffer is not None:
                self._free.remove(buffer)
        pinned = 0.0
        if buffer is None:  # pinned outside the lock: it takes long, and `give` needs the lock
            t0 = time.perf_counter()
            buffer = self._allocate(max(self.STEP, -(-nbytes // self.STEP) * self.STEP))
            pinned = time.perf_counter() - t0
        with self._lock:
            if pinned:
                self.allocated += 1
                self.allocate_seconds += pinned
            self.lent_bytes += int(buffer.nbytes)
            self.peak_lent_bytes = max(self.peak_lent_bytes, self.lent_bytes)
        return _Arena(buffer, self)

    def give(self, buffer: Any) -> None:
        with self._lock:
            self.lent_bytes -= int(buffer.nbytes)
            if not self._closed and sum(b.nbytes for b in self._free) + buffer.nbytes \
                    <= SPARE_BYTES:
                self._free.append(buffer)
                return
            self.freed += 1
        with contextlib.suppress(Exception):  # interpreter exit: CUDA may be gone
            buffer.close()

    def stats(self) -> dict[str, Any]:
        """Pinning so far: buffers made and freed, seconds it took, the most bytes lent at once."""
        with self._lock:
            return {"allocated": self.allocated, "freed": self.freed,
                    "allocate_seconds": round(self.allocate_seconds, 3),
                    "peak_lent_bytes": self.peak_lent_bytes}

    def close(self) -> None:
        """Free the spare buffers; those still lent are freed when they come back."""
        with self._lock:
            self._closed, free, self._free = True, self._free, []
        for buffer in free:
            buffer.close()


def turbo_decode(values: Sequence[bytes | None], target: FitTarget, cpu: ImageDecoder,
                 arenas: HostArenas) -> tuple[dict[int, HostImage], list[int]]:
    """The rows libjpeg-turbo decodes for the fit kernel, on `cpu`'s threads, and the rest.

    A complete RGB or gray JPEG within the pixel cap decodes at the largest power-of-two DCT
    scale that keeps it at least its resized size (`dct_factor`; whole with `draft` off) into
    one pinned arena for the call. Every other row (null, not a JPEG, truncated, CMYK, too
    large, failing to decode) is returned for the CPU path, which gives its pixels or its error
    exactly as without the GPU. Each row holds the GIL for a few microseconds: the threads
    scale with the CPUs (Pillow's resize and copies, on the CPU path, do not).
    """
    simplejpeg = import_simplejpeg()
    if simplejpeg is None:
        return {}, list(range(len(values)))
    planned: list[tuple[int, bytes, int, int, int, tuple[int, int]]] = []
    on_cpu: list[int] = []
    offset = 0
    for i, data in enumerate(values):
        if data is None or not is_jpeg(data) or not jpeg_complete(data):
            on_cpu.append(i)
            continue
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            check_pixels(width, height, target.max_pixels)
        except Exception:  # not a JPEG libjpeg parses, or too large: the CPU path says which
            on_cpu.append(i)
            continue
        if colorspace in ("CMYK", "YCCK"):
            on_cpu.append(i)  # Pillow converts those
            continue
        factor = dct_factor(width, height, target.resize) if target.draft else 1
        h, w = -(-height // factor), -(-width // factor)
        planned.append((i, data, offset, h, w, (width, height)))
        offset += h * w * 3
    if not planned:
        return {}, on_cpu
    arena = arenas.take(offset)
    flat = arena.view(np.uint8, (arena.nbytes,))

    def decode(chunk: Sequence[tuple[int, bytes, int, int, int, tuple[int, int]]]
               ) -> list[tuple[int, HostImage | None]]:
        done: list[tuple[int, HostImage | None]] = []
        for i, data, at, h, w, original in chunk:
            scaled = (h, w) != original[::-1]
            try:
                got = simplejpeg.decode_jpeg(data, "RGB", min_height=h if scaled else 0,
                                             min_width=w if scaled else 0,
                                             buffer=flat[at:at + h * w * 3], strict=False)
                ok = tuple(got.shape) == (h, w, 3)
            except Exception:  # corrupt inside: the CPU path gives the reason
                ok = False
            done.append((i, HostImage(arena, at, h, w, original) if ok else None))
        return done

    decoded: dict[int, HostImage] = {}
    for chunk_done in cpu.spread(decode, planned):
        for i, image in chunk_done:
            if image is None:
                on_cpu.append(i)
            else:
                decoded[i] = image
    on_cpu.sort()
    return decoded, on_cpu


class _Kernel:
    """The fit kernels compiled with NVRTC for this device and loaded in its primary context."""

    def __init__(self, device_id: int) -> None:
        from cuda.bindings import driver, nvrtc

        from workers import cuda

        self._driver = driver
        major, minor = cuda.compute_capability(device_id)
        program = cuda.check(nvrtc.nvrtcCreateProgram(KERNEL_SOURCE.encode(), b"fit.cu", 0, [],
                                                      []), "nvrtcCreateProgram")
        try:
            options = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"--std=c++17",
                       b"-default-device"]
            status = nvrtc.nvrtcCompileProgram(program, len(options), options)[0]
            if int(status) != 0:
                size = cuda.check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
                log = b" " * int(size)
                cuda.check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
                raise BackendError(f"NVRTC could not compile the image fit kernel for sm_{major}"
                                   f"{minor}: {log.decode(errors='replace').strip()}")
            size = cuda.check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            cubin = b" " * int(size)
            cuda.check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        finally:
            cuda.check(nvrtc.nvrtcDestroyProgram(program), "nvrtcDestroyProgram")
        cuda.set_device(device_id)  # the primary context current: the module lives there
        self._module = cuda.check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.functions = {dtype: cuda.check(driver.cuModuleGetFunction(self._module, name.encode()),
                                            f"cuModuleGetFunction({name})")
                          for dtype, name in KERNELS.items()}

    def launch(self, dtype: np.dtype, rows_ptr: int, rows: int, out_ptr: int, target: FitTarget,
               stream: int) -> None:
        from workers import cuda

        height, width = target.size
        scale, shift = target.affine()
        values: list[np.ndarray] = [
                  np.array([rows_ptr], np.uint64), np.array([out_ptr], np.uint64),
                  np.array([height], np.int32), np.array([width], np.int32),
                  np.array([target.channels], np.int32),
                  np.array([target.layout == "NCHW"], np.int32),
                  *(np.array([v], np.float32) for v in (*scale, *shift))]
        params = np.array([v.ctypes.data for v in values], np.uint64)
        grid = -(-height * width // BLOCK)
        cuda.check(self._driver.cuLaunchKernel(self.functions[dtype], grid, rows, 1, BLOCK, 1, 1, 0,
                                               self._driver.CUstream(stream), params.ctypes.data, 0),
                   "cuLaunchKernel(fit)")

    def close(self) -> None:
        from workers import cuda

        module, self._module = self._module, None
        if module is not None:
            cuda.check(self._driver.cuModuleUnload(module), "cuModuleUnload")


class _SlotBuffers:
    """One slot's kernel rows and CPU-decoded pixels, pinned and on the device, for one input."""

    def __init__(self, max_rows: int, target: FitTarget) -> None:
        from workers import cuda

        height, width = target.size
        self.row_bytes = height * width * target.channels
        self._own: list[Any] = []
        try:
            self.rows_host = self._keep(cuda.PinnedBuffer(max_rows * ROW.itemsize))
            self.rows_device = self._keep(cuda.DeviceBuffer(max_rows * ROW.itemsize))
            self.pixels_host = self._keep(cuda.PinnedBuffer(max_rows * self.row_bytes))
            self.pixels_device = self._keep(cuda.DeviceBuffer(max_rows * self.row_bytes))
        except BaseException:
            self.close()
            raise
        self.records = self.rows_host.view(ROW, (max_rows,))
        self.pixels = self.pixels_host.view(np.uint8, (max_rows, height, width, target.channels))
        #: The images of the slot's last batch: alive until the slot is filled again (by then
        #: that batch was collected, so the copies and the kernel that read them are done).
        self.holding: list[DeviceImage | HostImage] = []
        #: Device memory for the batch's CPU-decoded images (`_Staging`), grown as needed.
        self.decoded: Any = None

    def decoded_device(self, nbytes: int) -> int:
        """A device pointer to at least `nbytes` for the batch's CPU-decoded images."""
        from workers import cuda

        if self.decoded is None or self.decoded.nbytes < nbytes:
            # The slot's last batch was collected: nothing reads the old buffer any more.
            if self.decoded is not None:
                self._own.remove(self.decoded)
                self.decoded.close()
                self.decoded = None
            self.decoded = self._keep(cuda.DeviceBuffer(-(-nbytes // HostArenas.STEP)
                                                        * HostArenas.STEP))
        return int(self.decoded.ptr)

    def _keep(self, resource: Any) -> Any:
        self._own.append(resource)
        return resource

    def close(self) -> None:
        self.holding = []
        while self._own:
            self._own.pop().close()


class _Staging:
    """Where one batch's CPU-decoded images go on the device: back to back in the slot's
    buffer, copied from their pinned arenas in as few copies as the rows allow (the rows of one
    decode call sit back to back in one arena)."""

    def __init__(self, buffers: _SlotBuffers, nbytes: int) -> None:
        self.base = buffers.decoded_device(nbytes) if nbytes else 0
        self.used = 0
        #: Copies to make: [source pointer, device offset, bytes].
        self.runs: list[list[int]] = []

    def place(self, image: HostImage) -> int:
        """The device pointer `image` will be at once `copy` has run."""
        source = image.arena.ptr + image.offset
        last = self.runs[-1] if self.runs else None
        # Runs are back to back on the device: one goes on while its source does.
        if last is not None and last[0] + last[2] == source:
            last[2] += image.nbytes
        else:
            self.runs.append([source, self.used, image.nbytes])
        at = self.base + self.used
        self.used += image.nbytes
        return at

    def copy(self, stream: int) -> None:
        from workers import cuda

        for source, offset, nbytes in self.runs:
            cuda.copy_htod_async(self.base + offset, source, nbytes, stream)


class GpuImages:
    """nvImageCodec decoding and the fit kernel for a GPU actor's image inputs; close it when done.

    `targets`: the image inputs decoded on the GPU. Counts the rows each decoder decoded
    (`stats`). One per actor: the decoder, its stream and the kernel outlive shards.
    """

    def __init__(self, targets: Mapping[str, FitTarget], device_id: int = 0, threads: int = 1,
                 decoder: str = "nvimgcodec") -> None:
        from workers import cuda

        if decoder not in DECODERS:
            raise ValueError(f"GpuImages decoder must be one of {DECODERS}, got {decoder!r}")
        #: "nvimgcodec": the GPU decodes (nvImageCodec); "turbo": libjpeg-turbo on the actor's
        #: CPU threads into pinned memory (`turbo_decode`), the GPU only resizes and lays out.
        self.decoder = decoder
        nvimgcodec = import_nvimgcodec() if decoder == "nvimgcodec" else None
        self.targets = dict(targets)
        self.inputs = frozenset(self.targets)
        self.device_id = device_id
        self._nv: Any = nvimgcodec
        self._lock = threading.Lock()
        self._slots: dict[tuple[int, str], _SlotBuffers] = {}
        #: nvImageCodec images of batches that are done, for the next decodes to reuse.
        self._spare: list[Any] = []
        self._spare_bytes = 0
        self.gpu_rows = 0
        self.cpu_rows = 0
        self._stream: Any = None
        self._kernel: _Kernel | None = None
        self._owner: _DecodeResources | None = None
        self._arenas: HostArenas | None = None
        cuda.set_device(device_id)
        if nvimgcodec is None:
            try:
                self._arenas = HostArenas()
                self._kernel = _Kernel(device_id)
            except BaseException:
                self.close()
                raise
            return
        try:
            # High priority: a batch's decode kernels start ahead of the engine's blocks
            # queued on the slots' streams rather than after them. (Beside a ResNet-50 it still
            # decoded at a sixth of its speed alone; the default priority's run crashed inside
            # nvImageCodec, so the gain is not measured: bench/results/session25.)
            self._stream = cuda.Stream(high_priority=True)
            kinds = nvimgcodec.BackendKind
            # GPU decoders only (the hardware JPEG decoder where the GPU has one, then CUDA,
            # then CUDA with the CPU's Huffman decoding): what none of them decodes goes to
            # this job's own CPU decoder, which gives the CPU path's pixels and errors.
            self._decoder = nvimgcodec.Decoder(
                device_id=device_id, max_num_cpu_threads=max(1, threads),
                backends=[nvimgcodec.Backend(kinds.HW_GPU_ONLY),
                          nvimgcodec.Backend(kinds.GPU_ONLY),
                          nvimgcodec.Backend(kinds.HYBRID_CPU_GPU)])
            self._params = nvimgcodec.DecodeParams(
                apply_exif_orientation=False,  # as Pillow's and libjpeg's decodes
                color_spec=nvimgcodec.ColorSpec.SRGB, allow_any_depth=False,
                sample_format=nvimgcodec.SampleFormat.I_RGB)
            self._owner = _DecodeResources(self._decoder, self._stream)
            self._kernel = _Kernel(device_id)
        except BaseException:
            self.close()
            raise

    # the converting thread ---------------------------------------------------------------------
    def decode(self, name: str, values: Sequence[bytes | None], cpu: ImageDecoder
               ) -> tuple[np.ndarray, dict[int, str]]:
        """One object per row (a DeviceImage, or the CPU's uint8 pixels), and the bad rows' reasons.

        `cpu` decodes the rows the GPU does not, to raw uint8 NHWC pixels at the crop's size.
        """
        target = self.targets[name]
        out = np.empty(len(values), dtype=object)
        if self._arenas is not None:
            decoded, on_cpu = turbo_decode(values, target, cpu, self._arenas)
            for i, host in decoded.items():
                out[i] = host
            return out, self._on_cpu(out, values, on_cpu, cpu, len(decoded))
        streams, rows, on_cpu = [], [], []
        # With decode auto, JPEGs already at the model's size decode on the CPU when it has
        # threads enough (`ImageDecoder.fast_at_size`): nothing is resized, libjpeg-turbo decodes them on every
        # CPU faster than the engine runs, and nvImageCodec would take GPU time from the engine.
        cpu_at_size = target.cpu_at_size and cpu.fast_at_size
        for i, data in enumerate(values):
            if data is None or not is_jpeg(data):
                # The GPU decoders installed (nvJPEG, its hardware engine) take JPEG only: a PNG
                # given to them fails there, with a warning per image, before the CPU takes it.
                on_cpu.append(i)
                continue
            if not jpeg_complete(data):
                on_cpu.append(i)  # truncated: nvJPEG may decode what it has; the CPU refuses
                continue
            # libjpeg-turbo's header parse (fast_at_size has it), not nvImageCodec's, for rows
            # nvImageCodec never sees.
            if cpu_at_size and (size := jpeg_size(data)) is not None and \
                    resized_size(*size, target.resize) == size:
                on_cpu.append(i)
                continue
            try:
                stream = self._nv.CodeStream(data)
                check_pixels(int(stream.width), int(stream.height), target.max_pixels)
            except Exception:  # not an image it parses, or too large: the CPU path says which
                on_cpu.append(i)
                continue
            streams.append(stream)
            rows.append(i)
        images = self._decode(streams) if streams else []
        on_gpu = 0
        for i, image in zip(rows, images, strict=True):
            if image is None:  # no GPU decoder took it, or it is corrupt: the CPU decides
                on_cpu.append(i)
            else:
                out[i] = DeviceImage(image, self._owner)
                on_gpu += 1
        return out, self._on_cpu(out, values, sorted(on_cpu), cpu, on_gpu)

    def _on_cpu(self, out: np.ndarray, values: Sequence[bytes | None], on_cpu: list[int],
                cpu: ImageDecoder, on_gpu: int) -> dict[int, str]:
        """The CPU path's pixels for rows `on_cpu` (sorted) into `out`; the bad rows' reasons.

        The CPU decoder's threads (and processes) give raw uint8 pixels at the crop's size, and
        the kernel normalizes them with the other rows. `on_gpu`: the rows decoded for the
        kernel to resize (counted as `gpu_rows`)."""
        bad: dict[int, str] = {}
        if on_cpu:
            pixels, failed = cpu.decode([values[i] for i in on_cpu])
            for k, i in enumerate(on_cpu):
                if k in failed:
                    bad[i] = failed[k]
                else:
                    out[i] = pixels[k]
        with self._lock:
            self.gpu_rows += on_gpu
            self.cpu_rows += len(on_cpu) - len(bad)
        return bad

    # the GPU loop --------------------------------------------------------------------------------
    def fill(self, slot: Any, name: str, parts: Sequence[np.ndarray], rows: int) -> None:
        """Write the batch of `parts` (its rows in order) into `slot`'s device input `name`."""
        from workers import cuda

        assert self._kernel is not None
        target = self.targets[name]
        buffers = self._buffers(slot, name, target)
        records, fallback = buffers.records, 0
        holding: list[DeviceImage | HostImage] = []
        staged = _Staging(buffers, sum(item.nbytes for part in parts for item in part
                                       if isinstance(item, HostImage)))
        row = 0
        height, width = target.size
        for part in parts:
            for item in part:
                record = records[row]
                if isinstance(item, DeviceImage):
                    new_h, new_w, top, left = fit_row(item.width, item.height, target.size,
                                                      target.resize)
                    record["src"], record["pitch"], record["src_c"] = item.ptr, item.pitch, 3
                    record["src_h"], record["src_w"] = item.height, item.width
                    holding.append(item)
                elif isinstance(item, HostImage):
                    # Resized from its reduced decode to the original's resized size, as the
                    # CPU path resizes its DCT-scaled decodes.
                    new_h, new_w, top, left = fit_row(*item.original, target.size, target.resize)
                    record["src"] = staged.place(item)
                    record["pitch"], record["src_c"] = item.width * 3, 3
                    record["src_h"], record["src_w"] = item.height, item.width
                    holding.append(item)
                else:  # CPU-decoded pixels, already at the crop's size: copied, not resized
                    buffers.pixels[fallback] = item
                    record["src"] = buffers.pixels_device.ptr + fallback * buffers.row_bytes
                    record["pitch"], record["src_c"] = width * target.channels, target.channels
                    record["src_h"], record["src_w"] = height, width
                    new_h, new_w, top, left = height, width, 0, 0
                    fallback += 1
                record["new_h"], record["new_w"], record["top"], record["left"] = (
                    new_h, new_w, top, left)
                row += 1
        if row != rows:
            raise BackendError(f"image input '{name}' got {row} rows for a batch of {rows}")
        # This slot's last batch was collected: its images go back for the decoder to reuse.
        spent, buffers.holding = buffers.holding, holding
        self._give_back([d.image for d in spent if isinstance(d, DeviceImage)])
        cuda.set_device(self.device_id)  # this thread's current context: the kernel's
        stream = slot.stream.handle
        staged.copy(stream)
        cuda.copy_htod_async(buffers.rows_device.ptr, buffers.rows_host.ptr,
                             rows * ROW.itemsize, stream)
        if fallback:
            cuda.copy_htod_async(buffers.pixels_device.ptr, buffers.pixels_host.ptr,
                                 fallback * buffers.row_bytes, stream)
        out = slot.device_input(name)
        self._kernel.launch(target.dtype, buffers.rows_device.ptr, rows, out, target, stream)
        if rows < slot.max_rows:  # padding rows (outputs dropped): zeros, as on the host path
            row_bytes = height * width * target.channels * target.dtype.itemsize
            cuda.check(cuda.runtime().cudaMemsetAsync(out + rows * row_bytes, 0,
                                                      (slot.max_rows - rows) * row_bytes, stream),
                       "cudaMemsetAsync")
        slot.filled_inputs = slot.filled_inputs | {name}

    def _decode(self, streams: list[Any]) -> list[Any]:
        """nvImageCodec's decode of a batch into device images, reusing spent ones' memory."""
        with self._lock:
            reuse = self._spare[-len(streams):] if len(self._spare) >= len(streams) else None
            if reuse is not None:
                del self._spare[-len(streams):]
                self._spare_bytes -= sum(int(i.height) * int(i.width) * 3 for i in reuse)
        # Decoding into images of batches already done keeps device memory from being freed
        # and allocated for every batch (a synchronous cudaFree would stall the GPU's queue).
        images = self._decoder.decode(streams, images=reuse, params=self._params,
                                      cuda_stream=self._stream.handle)
        # Decoded when the stream gets here: wait (this thread only converts), so the images
        # are ready for any slot's stream without an event per batch.
        self._stream.synchronize()
        # The images given for rows that failed are dropped, not kept for reuse: what a failed
        # decode leaves in them is not documented, and one reused might be read half-written.
        return list(images)

    def _give_back(self, images: list[Any]) -> None:
        """Keep `images` for reuse, up to `SPARE_BYTES` of them (the rest are freed)."""
        with self._lock:
            for image in images:
                size = int(image.height) * int(image.width) * 3
                if self._spare_bytes + size > SPARE_BYTES:
                    break
                self._spare.append(image)
                self._spare_bytes += size

    def probe(self) -> None:
        """Raise BackendError unless a small JPEG decodes on this GPU (nvImageCodec's)."""
        if self._arenas is not None:
            return  # libjpeg-turbo decodes; the kernel compiled and loaded in __init__
        images = self._decoder.decode([self._nv.CodeStream(_probe_jpeg())], params=self._params,
                                      cuda_stream=self._stream.handle)
        self._stream.synchronize()
        if not images or images[0] is None:
            raise BackendError(f"nvImageCodec decoded no test JPEG on CUDA device {self.device_id}")

    def _buffers(self, slot: Any, name: str, target: FitTarget) -> _SlotBuffers:
        key = (id(slot), name)
        with self._lock:
            buffers = self._slots.get(key)
            if buffers is None:
                buffers = self._slots[key] = _SlotBuffers(slot.max_rows, target)
            return buffers

    def stats(self) -> dict[str, Any]:
        return {"decode": "gpu" if self._arenas is None else "libjpeg-turbo, resized on the gpu",
                "gpu_rows": self.gpu_rows, "cpu_rows": self.cpu_rows,
                **({"pinned": self._arenas.stats()} if self._arenas is not None else {})}

    def close(self) -> None:
        """Free the slots' buffers, the kernel module and the decode stream (after its work)."""
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
            self._spare, self._spare_bytes = [], 0
        for buffers in slots:
            buffers.close()
        kernel, self._kernel = self._kernel, None
        if kernel is not None:
            kernel.close()
        arenas, self._arenas = self._arenas, None
        if arenas is not None:
            arenas.close()
        # The decoder and its stream go with the last image still held (`_DecodeResources`).
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.synchronize()
        owner = self.__dict__.pop("_owner", None)
        self.__dict__.pop("_decoder", None)
        if owner is None and stream is not None:  # failed in __init__ before the owner
            stream.close()
        del owner


def _probe_jpeg() -> bytes:
    """A small JPEG to check that the GPU decodes at all."""
    import io

    from workers.images import import_pil

    Image = import_pil()
    buffer = io.BytesIO()
    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def fit_targets(specs: Sequence[Any], metas: Mapping[str, Any]) -> dict[str, FitTarget]:
    """The image inputs that may decode on the GPU (`decode` gpu or auto), as fit targets.

    Raises BackendError for an input `decode: gpu` asks for that the kernel cannot write.
    """
    from workers.preprocess import ImagePrep

    targets: dict[str, FitTarget] = {}
    for spec in specs:
        if not isinstance(spec, ImagePrep) or spec.decode == "cpu" or spec.input is None:
            continue
        meta = metas[spec.input]
        if meta.dtype not in KERNELS:
            if spec.decode == "gpu":
                raise BackendError(f"--image-decode gpu writes uint8, float16, float32 or float64 "
                                   f"inputs, but input '{meta.name}' is {meta.describe()}; pass "
                                   "--image-decode cpu")
            continue
        assert spec.size is not None and spec.resize is not None and spec.mode is not None
        targets[spec.input] = FitTarget(
            input=spec.input, mode=spec.mode, size=spec.size, resize=spec.resize,
            mean=tuple(spec.mean or ()), std=tuple(spec.std or ()), layout=spec.layout,
            dtype=np.dtype(meta.dtype), max_pixels=spec.max_pixels,
            cpu_at_size=spec.decode == "auto", draft=spec.draft)
    return targets


def open_gpu_images(specs: Sequence[Any], metas: Mapping[str, Any], on_gpu: bool,
                    device_id: int = 0, threads: int = 1, at_size: Collection[str] = ()
                    ) -> tuple[GpuImages | None, str]:
    """The actor's GPU image decoding for `specs`, or None; and how its images decode, in words.

    `on_gpu`: the actor's backend runs on a GPU (slots). `decode: auto` on `threads` of at
    least `FAST_THREADS` with libjpeg-turbo: JPEGs decode on those threads into pinned memory
    and the fit kernel resizes them (`turbo_decode`); on fewer threads it takes nvImageCodec
    where it imports and decodes a test image, else the CPU (the words say why). `decode: gpu`
    takes nvImageCodec, and raises where it cannot. `at_size`: inputs whose sampled rows are
    JPEGs at the model's size (`WorkerConfig.at_size_images`); with `decode: auto` and `threads` of at least
    `FAST_THREADS` (and libjpeg-turbo), they decode on the CPU, and nvImageCodec is not opened
    for them: beside the engine it decoded a sixth of its speed alone, and through the GPU
    path the CPU's rows ran at 0.56 of the engine against 0.94 on the CPU path
    (bench/results/session26).
    """
    from workers.preprocess import ImagePrep

    images_in = [s for s in specs if isinstance(s, ImagePrep) and s.decode != "cpu"]
    fast = threads >= FAST_THREADS and import_simplejpeg() is not None
    on_cpu = [s for s in images_in if fast and s.decode == "auto" and s.mode == "RGB"
              and s.input in at_size]
    wanted = [s for s in images_in if s not in on_cpu]
    if not wanted:
        if on_cpu and on_gpu:
            return None, (f"cpu (JPEGs stored at the model's size: libjpeg-turbo on {threads} "
                          "threads; --image-decode gpu decodes them on the GPU)")
        return None, "cpu"
    required = any(s.decode == "gpu" for s in wanted)
    # decode auto on threads enough: libjpeg-turbo decodes on the CPU, the GPU resizes.
    # Beside a ResNet-50, nvImageCodec decoded a sixth of its speed alone (the two share the
    # GPU), and Pillow's resize on the CPU threads queues on the GIL (bench.decode_scaling).
    decoder = "nvimgcodec" if required or not fast else "turbo"
    if not on_gpu:
        if required:
            raise BackendError("--image-decode gpu needs a GPU actor, and this one runs its model "
                               "on the CPU; pass --image-decode cpu (or auto)")
        return None, "cpu (the actor has no GPU)"
    images: GpuImages | None = None
    try:
        targets = fit_targets([s for s in specs if s not in on_cpu], metas)
        if not targets:
            return None, "cpu (no image input the GPU kernel writes)"
        images = GpuImages(targets, device_id, threads, decoder)
        images.probe()
    except Exception as exc:
        if images is not None:
            images.close()
        if required:
            raise
        return None, f"cpu (GPU decoding unavailable: {exc})"
    if decoder == "turbo":
        return images, (f"cpu+gpu (libjpeg-turbo on {threads} threads, resized on the GPU; "
                        "--image-decode gpu decodes on the GPU)")
    return images, "gpu"
