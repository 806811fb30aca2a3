"""Images: decoding encoded bytes into fixed-size pixel arrays, and reading directories of image files."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from workers.errors import DataError, MissingDependencyError
from workers.storage import filesystem, storage_errors
from workers.types import Shard

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The columns an image-directory input presents, as if it were a table.
PATH_COLUMN, IMAGE_COLUMN = "path", "image"
IMAGE_DIR_SCHEMA = pa.schema([(PATH_COLUMN, pa.string()), (IMAGE_COLUMN, pa.binary())])


def is_image_name(path: str) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependencyError("the image preprocessor needs Pillow; pip install "
                                     "'.[images]' (or pip install pillow)") from exc
    return Image


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `shorter`, as torchvision's Resize(int) does."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def load_image(data: bytes, mode: str, size: tuple[int, int], resize: int,
               draft: bool = False) -> np.ndarray:
    """Decode, convert to `mode`, resize the shorter side to `resize`, center-crop to `size` (h, w).

    Returns uint8 `[h, w, channels]`. Raises whatever Pillow raises for a bad image.
    """
    Image = import_pil()
    height, width = size
    with Image.open(io.BytesIO(data)) as image:
        if draft and image.format == "JPEG":
            # Decode at a reduced scale (a power of two no smaller than needed): much faster for
            # large photos, at the cost of pixels that differ slightly from a full decode.
            image.draft(mode, resized_size(image.width, image.height, resize))
        rgb = image.convert(mode)
    new_w, new_h = resized_size(rgb.width, rgb.height, resize)
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = round((new_h - height) / 2.0)
    left = round((new_w - width) / 2.0)
    if (left, top, width, height) != (0, 0, new_w, new_h):
        rgb = rgb.crop((left, top, left + width, top + height))
    array = np.asarray(rgb, dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


def _affine(mean: Sequence[float], std: Sequence[float], dtype: np.dtype
            ) -> tuple[np.ndarray, np.ndarray]:
    """`scale`, `shift` with `pixels * scale + shift == (pixels / 255 - mean) / std`."""
    work = np.float64 if dtype == np.float64 else np.float32
    std64 = np.asarray(std, dtype=np.float64)
    return ((1.0 / (std64 * 255.0)).astype(work),
            (-np.asarray(mean, dtype=np.float64) / std64).astype(work))


class ImageDecoder:
    """Decodes a column of encoded images into model input `[N, ...]`, rows split over a pool.

    Each row is decoded, resized and cropped (`load_image`), then scaled to
    `(pixels / 255 - mean) / std` and written in `layout` and `dtype` straight into the batch,
    all on the row's thread: Pillow releases the GIL while decoding and resizing, numpy while
    scaling, so threads give real parallelism and each image is touched while in cache.
    Without `mean`/`std` (or for an integer `dtype`) the pixels stay raw. A row that fails to
    decode is returned in `bad` (row -> reason), its pixels left zero.
    """

    def __init__(self, mode: str, size: tuple[int, int], resize: int, draft: bool = False,
                 pool: Executor | None = None, threads: int = 1, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 layout: str = "NHWC", dtype: np.dtype | None = None) -> None:
        self.mode, self.size, self.resize, self.draft = mode, size, resize, draft
        self.channels = 1 if mode == "L" else 3
        self.pool = pool
        self.threads = max(1, threads)
        self.layout = layout
        self.dtype = np.dtype(dtype or np.uint8)
        self._scale: np.ndarray | None = None
        self._shift: np.ndarray | None = None
        if self.dtype.kind == "f":
            scale, shift = _affine(mean or (0.0,) * self.channels, std or (1.0,) * self.channels,
                                   self.dtype)
            if layout == "NCHW":  # broadcast over (C, H, W)
                scale, shift = scale[:, None, None], shift[:, None, None]
            self._scale, self._shift = scale, shift
        height, width = size
        self.row_shape = ((self.channels, height, width) if layout == "NCHW"
                          else (height, width, self.channels))

    def _put(self, pixels: np.ndarray, target: np.ndarray) -> None:
        source = pixels.transpose(2, 0, 1) if self.layout == "NCHW" else pixels
        if self._scale is None or self._shift is None:
            target[...] = source
        elif self.dtype in (np.float32, np.float64):
            np.multiply(source, self._scale, out=target, casting="unsafe")
            np.add(target, self._shift, out=target)
        else:  # float16 and friends: scale in float32, round once
            target[...] = source * self._scale + self._shift

    def _decode_rows(self, values: Sequence[bytes | None], out: np.ndarray, start: int,
                     stop: int) -> dict[int, str]:
        bad: dict[int, str] = {}
        for i in range(start, stop):
            data = values[i]
            if data is None:
                bad[i] = "null image"
                continue
            try:
                pixels = load_image(data, self.mode, self.size, self.resize, self.draft)
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
                bad[i] = f"cannot decode image ({exc.__class__.__name__}: {exc})"
                continue
            self._put(pixels, out[i])
        return bad

    def decode(self, values: Sequence[bytes | None]) -> tuple[np.ndarray, dict[int, str]]:
        """The batch `[N, *row_shape]` in `dtype`, and the rows that failed, with why."""
        n = len(values)
        # Every good row is written whole, so only bad rows need zeros: no extra pass over a
        # batch that is ~150 MB for 256 RGB images at 224 px in float32.
        out = np.empty((n, *self.row_shape), self.dtype)
        if self.pool is None or self.threads == 1 or n < 2:
            bad = self._decode_rows(values, out, 0, n)
        else:
            step = -(-n // self.threads)
            futures = [self.pool.submit(self._decode_rows, values, out, lo, min(n, lo + step))
                       for lo in range(0, n, step)]
            bad = {}
            for future in futures:
                bad.update(future.result())
        for row in bad:
            out[row] = 0
        return out, bad


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float], layout: str,
              dtype: np.dtype) -> np.ndarray:
    """uint8 `[N, h, w, c]` -> `(pixels / 255 - mean) / std` in `dtype`, laid out NCHW or NHWC.

    Integer dtypes get the raw pixel values. (The preprocessor does this per row, on its
    threads; this whole-batch form is for pixels decoded elsewhere.)
    """
    if dtype.kind in "iub":
        scaled = pixels.astype(dtype)
    else:
        scale, shift = _affine(mean, std, dtype)
        scaled = pixels.astype(scale.dtype)
        scaled *= scale
        scaled += shift
        scaled = scaled.astype(dtype, copy=False)
    if layout == "NCHW":
        scaled = scaled.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(scaled)


def _fetch(fs: Any, path: str, url: str, size: int) -> bytes:
    with storage_errors(f"cannot read '{url}'"):
        data: bytes = fs.cat_file(path)
    if len(data) != size:
        raise DataError(f"'{url}' changed after the job listed it (size {size} -> {len(data)}); "
                        "rerun the job to process the new contents")
    return data


def read_image_files(shard: Shard, columns: Sequence[str], batch_size: int,
                     storage_options: Mapping[str, Any] | None = None,
                     threads: int = 8) -> Iterator[pa.Table]:
    """Yield a files shard as tables of `batch_size` rows with columns `path` and/or `image`.

    The next batch's files are fetched while the current one is being processed.
    """
    unknown = sorted(set(columns) - set(IMAGE_DIR_SCHEMA.names))
    if unknown:
        raise DataError(f"an image-directory input has columns {IMAGE_DIR_SCHEMA.names}, "
                        f"not {unknown}")
    if not shard.files:
        return
    fs, _ = filesystem(shard.files[0].url, storage_options)
    groups = [shard.files[i:i + batch_size] for i in range(0, len(shard.files), batch_size)]
    want_bytes = IMAGE_COLUMN in columns
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="fetch") as pool:

        def submit(index: int) -> list[Future[bytes]]:
            if not want_bytes or index >= len(groups):
                return []
            return [pool.submit(_fetch, fs, fs._strip_protocol(f.url), f.url, f.size)
                    for f in groups[index]]

        ahead = submit(0)
        for index, group in enumerate(groups):
            current, ahead = ahead, submit(index + 1)
            data: dict[str, pa.Array] = {}
            if PATH_COLUMN in columns:
                data[PATH_COLUMN] = pa.array([f.url for f in group], pa.string())
            if want_bytes:
                data[IMAGE_COLUMN] = pa.array([f.result() for f in current], pa.binary())
            yield pa.table({name: data[name] for name in columns})
