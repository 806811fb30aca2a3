"""Images: decoding encoded bytes into fixed-size pixel arrays, and reading directories of image files.

JPEG, the format of nearly every photo set, decodes through libjpeg-turbo (simplejpeg), which
releases the GIL and can decode at 1/8 .. 8/8 scale (DCT scaling) when the target is smaller
than the image; everything else decodes through Pillow, in worker processes when several are
given (`workers.helpers.HelperProcesses`). GPU decoding (nvImageCodec) is `workers.gpuimages`.
"""

from __future__ import annotations

import io
import posixpath
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from workers.errors import DataError, MissingDependencyError
from workers.storage import filesystem, storage_errors
from workers.types import Shard

if TYPE_CHECKING:
    from workers.helpers import HelperProcesses

T = TypeVar("T")
R = TypeVar("R")

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
    # Pillow only warns between its MAX_IMAGE_PIXELS and twice that (and raises above): make
    # the warning an error too, so a decompression bomb is a bad row (on_error) either way.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    return Image


def import_simplejpeg() -> Any | None:
    """simplejpeg (libjpeg-turbo, GIL released while decoding), or None when not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


#: Threads from which JPEGs at the model's size decode on the CPU on the GPU path: on a lent
#: H100's 16-CPU host, 16 threads decoded 224-px JPEGs at 18,300-19,600 rows/s (~1,150 a
#: thread), 3x a ResNet-50's 6,300 rows/s, while nvImageCodec beside that engine decoded 3,100
#: (bench/results/session25); 8 threads still outpace such an engine.
FAST_THREADS = 8
#: Per side, how many times larger than `resize` an image may be by default (see `max_pixels`).
MAX_SCALE = 32


def default_max_pixels(resize: int) -> int:
    """The pixel cap of images resized to `resize`: (MAX_SCALE x resize)^2, at most Pillow's own.

    Decoding costs memory in proportion to the image's pixels whatever the target size, so a
    small compressed file can ask for gigabytes (a 137 KB PNG of 12000x12000 pixels peaks at
    600 MB per decode, times the decoding threads). An image beyond this is a bad row.
    """
    Image = import_pil()
    cap = (MAX_SCALE * resize) ** 2
    pillow = Image.MAX_IMAGE_PIXELS
    return int(min(cap, pillow)) if pillow else cap


class ImageLimitError(ValueError):
    """An image with more pixels than the job's `max_pixels`: a bad row, never decoded."""


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise ImageLimitError when `width x height` is over `max_pixels` (None: no cap)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLimitError(
            f"image of {width}x{height} pixels ({width * height / 1e6:.1f} MP) is over the "
            f"limit of {max_pixels / 1e6:.1f} MP (max_pixels); raise it with "
            "--max-image-pixels N if images this large are expected")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `shorter`, as torchvision's Resize(int) does."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def dct_factor(width: int, height: int, resize: int) -> int:
    """The largest of 8, 4, 2 that libjpeg can shrink a `width` x `height` JPEG by while it
    stays at least its resized size (DCT scaling); 1 when none does.

    Only powers of two: libjpeg-turbo's other scales (5/8, 3/4, ...) have no SIMD code and
    decoded a 500x375 photo slower than the whole image (1.10 against 0.92 ms here).
    """
    new_w, new_h = resized_size(width, height, resize)
    for factor in (8, 4, 2):
        if -(-width // factor) >= new_w and -(-height // factor) >= new_h:
            return factor
    return 1


def crop_origin(new_w: int, new_h: int, size: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of the center crop `size` (h, w) in an image resized to `new_w` x `new_h`."""
    height, width = size
    return round((new_w - width) / 2.0), round((new_h - height) / 2.0)


def _fit(image: Any, width: int, height: int, size: tuple[int, int], resize: int) -> Any:
    """Resize (shorter side to `resize`) and center-crop `image`, decoded from a `width` x `height` original.

    `image` may be a reduced-scale decode (libjpeg's DCT scaling, Pillow's draft) of the
    original: the resized size comes from the original's, so both decodes give the same shape.
    (Resizing only the crop's box would save a quarter of the resize for 4:3 photos, but its
    rounding differs from resize-then-crop by a level here and there.)
    """
    Image = import_pil()
    crop_h, crop_w = size
    new_w, new_h = resized_size(width, height, resize)
    left, top = crop_origin(new_w, new_h, size)
    if image.size != (new_w, new_h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if (left, top, crop_w, crop_h) == (0, 0, new_w, new_h):
        return image
    return image.crop((left, top, left + crop_w, top + crop_h))


def _as_pixels(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


def _load_turbo(simplejpeg: Any, data: bytes, mode: str, size: tuple[int, int], resize: int,
                draft: bool, max_pixels: int | None) -> np.ndarray | None:
    """A JPEG through libjpeg-turbo, shrunk during decoding when the target is smaller.

    None for JPEGs it does not turn into RGB (CMYK, YCCK): Pillow converts those.
    """
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace in ("CMYK", "YCCK"):
        return None
    check_pixels(width, height, max_pixels)
    if not jpeg_complete(data):
        # What Pillow refuses as "image file is truncated"; libjpeg would fill the rest gray.
        raise TruncatedImageError("JPEG data ends before its end-of-image marker (truncated)")
    new_w, new_h = resized_size(width, height, resize)
    # DCT scaling (1/8 .. 8/8) to the smallest scale still at least the resized size; the
    # decode is RGB even for one-channel models, converted below as Pillow converts, so the
    # pixels are the same as Pillow's path (libjpeg's own gray output skips the chroma).
    # strict=False: libjpeg's recoverable warnings (extraneous bytes before a marker, ...) do
    # not fail the image, as they do not in Pillow; truncation is checked above.
    rgb = simplejpeg.decode_jpeg(data, "RGB", min_height=new_h if draft else 0,
                                 min_width=new_w if draft else 0, strict=False)
    if mode == "RGB" and rgb.shape[:2] == (new_h, new_w):
        # Nothing to resize (images stored at the model's size): crop the array itself. The
        # pixels are what Pillow's crop gives, without two copies through Pillow that hold
        # the GIL (on 16 threads those turns at the GIL, not decoding, set the pace).
        left, top = crop_origin(new_w, new_h, size)
        return rgb[top:top + size[0], left:left + size[1]]
    Image = import_pil()
    image = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    return _as_pixels(_fit(image, width, height, size, resize))


def _load_pillow(data: bytes, mode: str, size: tuple[int, int], resize: int, draft: bool,
                 max_pixels: int | None) -> np.ndarray:
    Image = import_pil()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        check_pixels(width, height, max_pixels)
        if draft and image.format == "JPEG":
            # Decode at a reduced scale (a power of two no smaller than needed): much faster for
            # large photos, at the cost of pixels that differ slightly from a full decode.
            image.draft(mode, resized_size(width, height, resize))
        converted = image.convert(mode)
    return _as_pixels(_fit(converted, width, height, size, resize))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's header: libjpeg-turbo's parse (microseconds), else
    Pillow's; None where it does not read."""
    simplejpeg = import_simplejpeg()
    try:
        if simplejpeg is not None:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
        else:
            with import_pil().open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # simplejpeg raises ValueError, Pillow OSError and others
        return None
    return int(width), int(height)


def jpegs_at_size(values: Sequence[bytes | None], resize: int) -> bool:
    """True when `values` hold at least one image and every one is a JPEG whose shorter side is
    already `resize` (nothing to resize: `ImageDecoder.fast_at_size` decodes such rows)."""
    seen = 0
    for data in values:
        if data is None:
            continue
        size = jpeg_size(data) if is_jpeg(data) else None
        if size is None or resized_size(*size, resize) != size:
            return False
        seen += 1
    return seen > 0


def is_jpeg(data: bytes) -> bool:
    """True when `data` starts like a JPEG (the SOI marker)."""
    return data[:3] == b"\xff\xd8\xff"


def jpeg_complete(data: bytes) -> bool:
    """True when a JPEG's last scan is followed by its end-of-image marker (it is not truncated).

    Entropy-coded data cannot hold an FF D9 or FF DA (0xFF is stuffed), and a thumbnail's end
    marker comes before the main image's scans, so the last EOI after the last SOS is the image's.
    Nearly every JPEG ends with its EOI: then any SOS at all (found near the start) is before
    it, and the scan back over the whole image for the last SOS is skipped (it holds the GIL,
    about 50 us for an 80 kB photo, which 16 decoding threads would take turns at).
    """
    if data.endswith(b"\xff\xd9"):
        return b"\xff\xda" in data
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


class TruncatedImageError(ValueError):
    """A JPEG that ends before its end-of-image marker."""


def load_image(data: bytes, mode: str, size: tuple[int, int], resize: int,
               draft: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """Decode, convert to `mode`, resize the shorter side to `resize`, center-crop to `size` (h, w).

    Returns uint8 `[h, w, channels]`. JPEGs go through libjpeg-turbo (simplejpeg) where it is
    installed, which releases the GIL while it decodes, so threads decode in parallel; other
    formats through Pillow. `draft`: a JPEG larger than needed is decoded at a reduced scale.
    `max_pixels`: an image with more pixels raises ImageLimitError before it is decoded.
    Raises whatever the decoder raises for a bad image.
    """
    simplejpeg = import_simplejpeg() if is_jpeg(data) else None
    if simplejpeg is not None:
        pixels = _load_turbo(simplejpeg, data, mode, size, resize, draft, max_pixels)
        if pixels is not None:
            return pixels
    return _load_pillow(data, mode, size, resize, draft, max_pixels)


def bad_image_reason(exc: Exception) -> str:
    """What a bad row's record says about the exception its decode raised."""
    if isinstance(exc, ImageLimitError):
        return str(exc)
    # Pillow names the buffer it read from (`<_io.BytesIO object at 0x7f...>`): an address that
    # differs from run to run says nothing about the row.
    text = _OBJECT_REPR.sub("", str(exc))
    return f"cannot decode image ({exc.__class__.__name__}: {text})"


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-f]+>")


def _decode_pillow_rows(values: Sequence[bytes], mode: str, size: tuple[int, int], resize: int,
                        draft: bool, max_pixels: int | None) -> list[np.ndarray | str]:
    """Runs in a worker process: each row's pixels, or the reason it failed."""
    out: list[np.ndarray | str] = []
    for data in values:
        try:
            out.append(load_image(data, mode, size, resize, draft, max_pixels))
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
            out.append(bad_image_reason(exc))
    return out


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
    all on the row's thread: libjpeg-turbo (JPEG) releases the GIL while decoding, Pillow while
    resizing, numpy while scaling, so threads give real parallelism and each image is touched
    while in cache. Images Pillow decodes (PNG, WebP, ...) go to `processes` when given, as
    Pillow holds the GIL while it decodes. Without `mean`/`std` (or for an integer `dtype`) the
    pixels stay raw. A row that fails to decode is returned in `bad` (row -> reason), its pixels
    left zero.
    """

    def __init__(self, mode: str, size: tuple[int, int], resize: int, draft: bool = False,
                 pool: Executor | None = None, threads: int = 1, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 layout: str = "NHWC", dtype: np.dtype | None = None,
                 max_pixels: int | None = None, processes: HelperProcesses | None = None
                 ) -> None:
        self.mode, self.size, self.resize, self.draft = mode, size, resize, draft
        self.max_pixels = max_pixels
        self.channels = 1 if mode == "L" else 3
        self.pool = pool
        self.threads = max(1, threads)
        self.processes = processes
        self.layout = layout
        self.dtype = np.dtype(dtype or np.uint8)
        self._turbo = import_simplejpeg() is not None
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

    @property
    def fast_at_size(self) -> bool:
        """True when JPEGs stored at the target's size decode here fast enough to leave the GPU
        to the engine: through libjpeg-turbo straight into an array (nothing to resize, no
        Pillow), on at least `FAST_THREADS` threads (`workers.gpuimages` routes them here)."""
        return self._turbo and self.mode == "RGB" and self.pool is not None and \
            self.threads >= FAST_THREADS

    def put(self, pixels: np.ndarray, target: np.ndarray) -> None:
        """Write uint8 `[h, w, c]` pixels into one row of the batch, normalized and laid out."""
        source = pixels.transpose(2, 0, 1) if self.layout == "NCHW" else pixels
        if self._scale is None or self._shift is None:
            target[...] = source
        elif self.dtype in (np.float32, np.float64):
            np.multiply(source, self._scale, out=target, casting="unsafe")
            np.add(target, self._shift, out=target)
        else:  # float16 and friends: scale in float32, round once
            target[...] = source * self._scale + self._shift

    def load(self, data: bytes) -> np.ndarray:
        """One image's uint8 pixels; raises as `load_image` does."""
        return load_image(data, self.mode, self.size, self.resize, self.draft, self.max_pixels)

    def spread(self, work: Callable[[Sequence[T]], R], items: Sequence[T]) -> list[R]:
        """`work` of `items` split into one chunk a thread (in order), run on the pool, or
        here when there is no pool, one thread or fewer than two items."""
        if self.pool is None or self.threads == 1 or len(items) < 2:
            return [work(items)]
        step = -(-len(items) // self.threads)
        futures = [self.pool.submit(work, items[lo:lo + step])
                   for lo in range(0, len(items), step)]
        return [future.result() for future in futures]

    def _decode_rows(self, values: Sequence[bytes | None], out: np.ndarray,
                     rows: Sequence[int]) -> dict[int, str]:
        bad: dict[int, str] = {}
        for i in rows:
            data = values[i]
            if data is None:
                bad[i] = "null image"
                continue
            try:
                pixels = self.load(data)
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
                bad[i] = bad_image_reason(exc)
                continue
            self.put(pixels, out[i])
        return bad

    def _split(self, values: Sequence[bytes | None]) -> tuple[list[int], list[int]]:
        """Rows for the threads, and rows for the processes (images Pillow decodes)."""
        if self.processes is None or self.threads == 1:
            return list(range(len(values))), []
        threaded: list[int] = []
        pillow: list[int] = []
        for i, data in enumerate(values):
            (threaded if data is None or (self._turbo and is_jpeg(data)) else pillow).append(i)
        if len(pillow) < 2:  # not worth a round trip
            return list(range(len(values))), []
        return threaded, pillow

    def decode(self, values: Sequence[bytes | None]) -> tuple[np.ndarray, dict[int, str]]:
        """The batch `[N, *row_shape]` in `dtype`, and the rows that failed, with why."""
        n = len(values)
        # Every good row is written whole, so only bad rows need zeros: no extra pass over a
        # batch that is ~150 MB for 256 RGB images at 224 px in float32.
        out = np.empty((n, *self.row_shape), self.dtype)
        threaded, pillow = self._split(values)
        bad: dict[int, str] = {}
        far: list[tuple[list[int], Future[list[np.ndarray | str]]]] = []
        if pillow:
            assert self.processes is not None
            step = -(-len(pillow) // self.processes.processes)
            for lo in range(0, len(pillow), step):
                chunk = pillow[lo:lo + step]
                data = [value for i in chunk if (value := values[i]) is not None]
                far.append((chunk, self.processes.pool().submit(
                    _decode_pillow_rows, data, self.mode, self.size, self.resize, self.draft,
                    self.max_pixels)))
        for failed in self.spread(lambda rows: self._decode_rows(values, out, rows), threaded):
            bad.update(failed)
        for chunk, pending in far:
            for i, result in zip(chunk, pending.result(), strict=True):
                if isinstance(result, str):
                    bad[i] = result
                else:
                    self.put(result, out[i])
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
