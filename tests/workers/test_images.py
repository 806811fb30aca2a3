"""Image decoding on the CPU: libjpeg-turbo (simplejpeg) against Pillow, DCT-scaled decodes,
Pillow formats in processes, the GPU kernel's arithmetic (`fit_reference`) against Pillow, and
the pixel cap (issue 17, point 8)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from tests.workers.test_preprocess import encode, meta, metas, pil_pixels, resolved_image
from workers.errors import BackendError, DataError
from workers.gpuimages import fit_reference, fit_row
from workers.helpers import HelperProcesses
from workers.images import (
    ImageDecoder,
    ImageLimitError,
    default_max_pixels,
    import_simplejpeg,
    load_image,
)
from workers.preprocess import Preprocessor

needs_turbo = pytest.mark.skipif(import_simplejpeg() is None,
                                 reason="simplejpeg is not installed (pip install '.[images]')")


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth picture with some texture: what photos look like to a JPEG coder."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.integers(-12, 13, (height, width, 3))
    return np.clip(smooth.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def jpeg(width: int, height: int, seed: int, **kwargs: Any) -> bytes:
    return encode(Image.fromarray(photo(width, height, seed)), "JPEG", quality=90, **kwargs)


@needs_turbo
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("subsampling", [0, 2])
def test_libjpeg_turbo_gives_pillows_pixels_without_draft(mode: str, subsampling: int) -> None:
    for seed, (w, h) in enumerate([(500, 375), (224, 224), (61, 97)]):
        data = jpeg(w, h, seed, subsampling=subsampling)
        got = load_image(data, mode, (64, 48), 64, draft=False)
        np.testing.assert_array_equal(got, pil_pixels(data, (64, 48), 64, mode))


@needs_turbo
@pytest.mark.parametrize("draft", [False, True])
def test_images_at_the_models_size_skip_pillow_with_its_pixels(draft: bool) -> None:
    # Nothing to resize: the decoded array is cropped as it is (no round trip through Pillow).
    for seed, (w, h) in enumerate([(224, 224), (240, 224), (224, 300), (1792, 1792)]):
        data = jpeg(w, h, seed)
        got = load_image(data, "RGB", (224, 224), min(w, h) if w < 1792 else 224, draft=draft)
        if w < 1792:
            np.testing.assert_array_equal(got, pil_pixels(data, (224, 224), min(w, h)))
        assert got.shape == (224, 224, 3)


@needs_turbo
def test_only_rgb_decoders_with_threads_enough_take_at_size_jpegs_from_the_gpu() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from workers.images import FAST_THREADS, ImageDecoder

    with ThreadPoolExecutor(2) as pool:
        assert ImageDecoder("RGB", (224, 224), 224, pool=pool, threads=FAST_THREADS).fast_at_size
        assert not ImageDecoder("RGB", (224, 224), 224, pool=pool,
                                threads=FAST_THREADS - 1).fast_at_size
        assert not ImageDecoder("L", (224, 224), 224, pool=pool,
                                threads=FAST_THREADS).fast_at_size
    assert not ImageDecoder("RGB", (224, 224), 224, threads=FAST_THREADS).fast_at_size  # no pool


def test_only_decode_auto_lets_jpegs_at_the_models_size_leave_the_gpu() -> None:
    from workers.gpuimages import fit_targets

    model = metas(meta("x", np.uint8, None, 24, 24, 3))
    for decode, cpu_at_size in (("auto", True), ("gpu", False)):
        (target,) = fit_targets([resolved_image(model, decode=decode)], model).values()
        assert target.cpu_at_size is cpu_at_size
    assert fit_targets([resolved_image(model, decode="cpu")], model) == {}


@needs_turbo
def test_dct_scaled_decoding_stays_close_to_a_full_decode() -> None:
    # 500x375 to 224: libjpeg decodes at 5/8 scale (313x235), then resizes to 298x224.
    for seed in range(3):
        data = jpeg(500, 375, seed)
        full = load_image(data, "RGB", (224, 224), 224, draft=False).astype(np.float64)
        draft = load_image(data, "RGB", (224, 224), 224, draft=True).astype(np.float64)
        assert full.shape == draft.shape == (224, 224, 3)
        # Texture (the noise) is where they differ: DCT scaling keeps more of it than the filter.
        assert np.abs(full - draft).mean() < 5.0
        assert np.percentile(np.abs(full - draft), 99) < 24


def test_a_cmyk_jpeg_goes_through_pillow() -> None:
    data = encode(Image.fromarray(photo(40, 30, 1)).convert("CMYK"), "JPEG", quality=95)
    got = load_image(data, "RGB", (24, 24), 24)
    np.testing.assert_array_equal(got, pil_pixels(data, (24, 24), 24))


def test_pillow_formats_decode_the_same_in_processes() -> None:
    rng = np.random.default_rng(3)
    images: list[bytes | None] = []
    for i in range(12):
        pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        images.append(encode(Image.fromarray(pixels), "PNG" if i % 2 else "WEBP", lossless=True)
                      if i % 4 != 3 else jpeg(40, 30 + i, i))
    images[5] = b"not an image"
    images[6] = None
    one, bad1 = ImageDecoder("RGB", (20, 20), 24).decode(images)
    from concurrent.futures import ThreadPoolExecutor

    processes = HelperProcesses(2)
    try:
        with ThreadPoolExecutor(2) as pool:
            decoder = ImageDecoder("RGB", (20, 20), 24, pool=pool, threads=2, processes=processes)
            assert decoder._split(images)[1], "PNG/WebP rows should go to the processes"
            many, bad2 = decoder.decode(images)
    finally:
        processes.close()
    assert sorted(bad1) == sorted(bad2) == [5, 6] and bad2[6] == "null image"
    assert bad2[5].startswith("cannot decode image (UnidentifiedImageError")
    np.testing.assert_array_equal(one, many)


def test_an_owners_pillow_processes_outlive_each_preprocessor() -> None:
    """An actor keeps its Pillow processes for every shard (starting them cost ~0.5 s per
    shard): a Preprocessor given them uses them and leaves them running when it closes; one
    without them starts its own and stops them."""
    model = metas(meta("pixels", np.float32, None, 3, 20, 20))
    spec = resolved_image(model, size=(20, 20), resize=24)
    rng = np.random.default_rng(4)
    table = pa.table({"jpeg": pa.array([encode(Image.fromarray(
        rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "PNG") for _ in range(6)],
        pa.binary())})
    shared = HelperProcesses(2)
    try:
        pools = []
        for _ in range(2):  # two shards
            with Preprocessor([spec], model, threads=2, processes=shared) as prep:
                prep(table)
                pools.append(shared._pool)
        assert pools[0] is not None and pools[0] is pools[1] is shared._pool
        with Preprocessor([spec], model, threads=2) as own:
            own(table)
            started = own._processes
            assert started is not None and started is not shared
            assert started._pool is not None
        assert started._pool is None  # closed with its preprocessor
    finally:
        shared.close()


@pytest.mark.parametrize("size,resize", [((24, 20), 28), ((224, 224), 224), ((16, 16), 16)])
@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_the_gpu_kernels_arithmetic_is_pillows_within_one_level(
        size: tuple[int, int], resize: int, mode: str, channels: int) -> None:
    rng = np.random.default_rng(4)
    for w, h in [(40, 30), (30, 41), (500, 375), (224, 224), (17, 50)]:
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = pil_pixels(encode(Image.fromarray(src), "PNG"), size, resize, mode)
        got = fit_reference(src, *fit_row(w, h, size, resize), size, channels)
        assert got.shape == want.shape
        assert np.abs(got.astype(np.int64) - want).max() <= 1
    # Pixels decoded elsewhere at the crop's size pass through unchanged.
    crop = rng.integers(0, 256, (*size, channels), dtype=np.uint8)
    np.testing.assert_array_equal(fit_reference(crop, *size, 0, 0, size, channels), crop)


# --- the pixel cap (issue 17, point 8) ---------------------------------------------------------


def test_the_default_cap_comes_from_resize_and_pillows_limit() -> None:
    assert default_max_pixels(224) == (32 * 224) ** 2
    assert default_max_pixels(4096) == Image.MAX_IMAGE_PIXELS
    assert resolved_image(metas(meta("x", np.float32, None, 3, 8, 8))).max_pixels == 256 ** 2
    assert resolved_image(metas(meta("x", np.float32, None, 3, 8, 8)),
                          max_pixels=10).max_pixels == 10


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_over_the_cap_is_a_bad_row_never_decoded(fmt: str) -> None:
    big = encode(Image.new("RGB", (300, 200)), fmt)
    with pytest.raises(ImageLimitError, match=r"image of 300x200 pixels \(0.1 MP\) is over the "
                                              r"limit of 0.0 MP \(max_pixels\); raise it with "
                                              r"--max-image-pixels N"):
        load_image(big, "RGB", (8, 8), 8, max_pixels=20_000)
    pixels, bad = ImageDecoder("RGB", (8, 8), 8, max_pixels=20_000).decode(
        [big, encode(Image.new("RGB", (100, 100)), fmt)])
    assert list(bad) == [0] and "over the limit" in bad[0]
    assert pixels.shape == (2, 8, 8, 3)


def test_the_cap_follows_on_bad_image() -> None:
    model = metas(meta("x", np.float32, None, 3, 8, 8))
    table = pa.table({"jpeg": pa.array([encode(Image.new("RGB", (300, 300)), "PNG"),
                                        encode(Image.new("RGB", (10, 10)), "PNG")], pa.binary())})
    with Preprocessor([resolved_image(model, max_pixels=50_000)], model) as prep, \
            pytest.raises(DataError, match=r"image column 'jpeg' row 7 of the shard: image of "
                                           r"300x300 pixels .* over the limit of 0.1 MP"):
        prep(table, offset=7)
    with Preprocessor([resolved_image(model, max_pixels=50_000, on_error="skip")], model) as prep:
        prepared = prep(table)
    assert list(prepared.failed) == [0] and "max_pixels" in prepared.failed[0][1]
    assert prepared.feeds["x"].shape == (1, 3, 8, 8)


def test_pillows_decompression_bomb_limit_is_a_bad_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that: the decoder makes it an error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    warned = encode(Image.new("RGB", (80, 80)), "PNG")  # 6,400 pixels: Pillow's warning zone
    _, bad = ImageDecoder("RGB", (8, 8), 8).decode([warned])
    assert "DecompressionBomb" in bad[0]


def test_the_image_directory_row_is_named_when_the_shard_fails() -> None:
    model = metas(meta("x", np.float32, None, 3, 8, 8))
    table = pa.table({"image": pa.array([b"junk"], pa.binary()),
                      "path": pa.array(["file:///images/a.png"])})
    spec = resolved_image(model)
    from dataclasses import replace

    with Preprocessor([replace(spec, column="image")], model) as prep, \
            pytest.raises(DataError, match=r"row 0 of the shard \('file:///images/a.png'\): "
                                           r"cannot decode image"):
        prep(table)


@needs_turbo
def test_a_sample_is_at_size_only_when_every_image_is_a_jpeg_at_the_models_size() -> None:
    from workers.images import jpegs_at_size

    at, wide, tall = jpeg(24, 24, 0), jpeg(32, 24, 1), jpeg(24, 40, 2)
    assert jpegs_at_size([at, None, wide, tall], 24)  # the shorter side is 24 in each
    assert not jpegs_at_size([at, jpeg(48, 36, 3)], 24)  # one to resize
    assert not jpegs_at_size([at, encode(Image.fromarray(photo(24, 24, 4)), "PNG")], 24)
    assert not jpegs_at_size([at, b"\xff\xd8\xff not a jpeg"], 24)
    assert not jpegs_at_size([None, None], 24) and not jpegs_at_size([], 24)


@needs_turbo
def test_at_size_inputs_skip_gpu_decoding_only_with_auto_and_threads_enough() -> None:
    from workers.gpuimages import open_gpu_images
    from workers.images import FAST_THREADS

    model = metas(meta("x", np.uint8, None, 24, 24, 3))
    auto = [resolved_image(model, decode="auto")]
    images, how = open_gpu_images(auto, model, True, 0, FAST_THREADS, at_size={"x"})
    assert images is None and how.startswith("cpu (JPEGs stored at the model's size")
    assert "--image-decode gpu" in how
    # Too few threads, or not sampled at size: nvImageCodec is tried (here it is unavailable
    # or there is no GPU, so the words say why, not "at the model's size").
    for threads, at_size in ((FAST_THREADS - 1, {"x"}), (FAST_THREADS, set())):
        images, how = open_gpu_images(auto, model, True, 0, threads, at_size=at_size)
        if images is not None:
            images.close()
        assert "model's size" not in how
    # decode gpu never leaves the GPU; on a CPU actor auto is the CPU anyway.
    gpu = [resolved_image(model, decode="gpu")]
    with pytest.raises(BackendError, match="--image-decode gpu needs a GPU actor"):
        open_gpu_images(gpu, model, False, 0, FAST_THREADS, at_size={"x"})
    assert open_gpu_images(auto, model, False, 0, FAST_THREADS, at_size={"x"}) == (None, "cpu")


def test_the_driver_samples_the_first_row_group_of_the_image_column(tmp_path: Any) -> None:
    import pyarrow.parquet as pq

    from jobs.image_sample import at_size_images
    from jobs.shards import InputFile, cut_shards, list_input, read_footers
    from workers.types import WorkerConfig

    model = metas(meta("x", np.uint8, None, 24, 24, 3))
    config = WorkerConfig(backend="onnxruntime", backend_config=None,  # type: ignore[arg-type]
                          output_url=str(tmp_path / "out"), bindings=(),
                          preprocess=(resolved_image(model, decode="auto"),))
    for name, size in (("at", 24), ("larger", 48)):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.table({"jpeg": [jpeg(size, size, i) for i in range(6)],
                                 "uid": list(range(6))}), folder / "a.parquet", row_group_size=3)
        fs, listing = list_input(str(folder))
        files = [f for f in read_footers(fs, listing) if isinstance(f, InputFile)]
        found = at_size_images(config, cut_shards(files, 3))
        assert found == (("x",) if name == "at" else ())


def test_jpeg_complete_takes_the_end_marker_fast_path_only_where_the_full_check_agrees() -> None:
    from workers.images import jpeg_complete

    def full_check(data: bytes) -> bool:
        return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0

    whole = jpeg(64, 48, 3)
    cases = {"whole": whole, "trailing bytes": whole + b"\x00\x00junk",
             "cut in its scan": whole[:len(whole) // 2], "cut before its EOI": whole[:-2],
             "headers only": whole[:whole.index(b"\xff\xda")] + b"\xff\xd9", "empty": b""}
    for name, data in cases.items():
        assert jpeg_complete(data) == full_check(data), name
    assert jpeg_complete(whole) and jpeg_complete(cases["trailing bytes"])
    assert not jpeg_complete(cases["cut in its scan"])
    assert not jpeg_complete(cases["headers only"])


def test_dct_factor_takes_only_powers_of_two_that_keep_the_resized_size() -> None:
    from workers.images import dct_factor

    assert dct_factor(500, 375, 224) == 1  # 1/2 would be 250x188, below 298x224
    assert dct_factor(640, 480, 224) == 2
    assert dct_factor(1920, 1080, 224) == 4
    assert dct_factor(4000, 3000, 224) == 8
    assert dct_factor(224, 224, 224) == 1
    assert dct_factor(447, 447, 224) == 2 and dct_factor(445, 445, 224) == 1  # ceil(w / 2)


class HostMemory:
    """numpy memory standing in for pinned memory (`HostArenas(allocate=...)`) on the CPU."""

    made = 0

    def __init__(self, nbytes: int) -> None:
        HostMemory.made += 1
        self.array = np.zeros(nbytes, np.uint8)
        self.nbytes, self.ptr, self.closed = nbytes, int(self.array.ctypes.data), False

    def view(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return self.array.view(dtype).reshape(shape)

    def close(self) -> None:
        self.closed = True


@needs_turbo
@pytest.mark.parametrize("draft", [True, False])
def test_turbo_decode_for_the_gpu_kernel_gives_the_cpu_paths_pixels(draft: bool) -> None:
    """The rows GPU actors decode with libjpeg-turbo (pinned memory, resized by the fit kernel):
    each JPEG at its power-of-two DCT scale; the kernel's arithmetic (`fit_reference`) on it
    stays within a few levels of the CPU path's pixels; every other row goes to the CPU path."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    import simplejpeg

    from workers.gpuimages import FitTarget, HostArenas, turbo_decode
    from workers.images import _fit, dct_factor

    cmyk = encode(Image.fromarray(photo(300, 200, 9)).convert("CMYK"), "JPEG")
    sizes = [(500, 375), (224, 224), (640, 480), (1920, 1080), (301, 257)]
    values: list[bytes | None] = [jpeg(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    whole = values[0]
    assert whole is not None
    values += [None, encode(Image.fromarray(photo(64, 64, 7)), "PNG"), whole[:len(whole) // 2],
               b"\xff\xd8\xff not a jpeg", cmyk]
    target = FitTarget(input="x", mode="RGB", size=(224, 224), resize=224, mean=(), std=(),
                       layout="NHWC", dtype=np.dtype(np.uint8), max_pixels=None, draft=draft)
    arenas = HostArenas(allocate=HostMemory)
    with ThreadPoolExecutor(4) as pool:
        cpu = ImageDecoder("RGB", (224, 224), 224, draft, pool=pool, threads=4)
        decoded, on_cpu = turbo_decode(values, target, cpu, arenas)
        assert sorted(decoded) == list(range(len(sizes)))
        assert on_cpu == list(range(len(sizes), len(values)))
        for i, (w, h) in enumerate(sizes):
            image, data = decoded[i], values[i]
            assert data is not None
            factor = dct_factor(w, h, 224) if draft else 1
            assert image.original == (w, h)
            assert (image.height, image.width) == (-(-h // factor), -(-w // factor))
            want = simplejpeg.decode_jpeg(data, "RGB", min_height=image.height,
                                          min_width=image.width)
            np.testing.assert_array_equal(image.pixels(), want)
            # The kernel's arithmetic on this decode is Pillow's resize and crop of it, as the
            # CPU path resizes its own decodes (which may be at other scales: 5/8, 3/4, ...).
            kernel = fit_reference(image.pixels(), *fit_row(w, h, (224, 224), 224), (224, 224), 3)
            pillow = np.asarray(_fit(Image.fromarray(image.pixels()), w, h, (224, 224), 224))
            assert np.abs(kernel.astype(np.int64) - pillow).max() <= 1
            if not draft:  # then both decode whole
                np.testing.assert_array_equal(pillow, cpu.load(data))
    # All rows of one call share one arena, which goes back for the next call once they go.
    assert len({id(image.arena) for image in decoded.values()}) == 1
    made = HostMemory.made
    del decoded, image
    gc.collect()
    turbo_decode(values[:2], target, ImageDecoder("RGB", (224, 224), 224, draft), arenas)
    assert HostMemory.made == made
    arenas.close()


def test_a_batchs_cpu_decoded_images_are_copied_in_as_few_runs_as_their_arenas_allow() -> None:
    from workers.gpuimages import HostArenas, HostImage, _Staging

    class Buffers:
        def decoded_device(self, nbytes: int) -> int:
            assert nbytes == 5 * 12
            return 1_000_000

    arenas = HostArenas(allocate=HostMemory)
    first, second = arenas.take(64), arenas.take(64)
    images = [HostImage(first, 0, 2, 2, (4, 4)), HostImage(first, 12, 2, 2, (4, 4)),
              HostImage(second, 0, 2, 2, (4, 4)), HostImage(first, 36, 2, 2, (4, 4)),
              HostImage(first, 48, 2, 2, (4, 4))]
    staged = _Staging(Buffers(), sum(i.nbytes for i in images))  # type: ignore[arg-type]
    assert [staged.place(i) for i in images] == [1_000_000 + 12 * k for k in range(5)]
    assert staged.runs == [[first.ptr, 0, 24], [second.ptr, 24, 12], [first.ptr + 36, 36, 24]]


def test_host_arenas_count_what_they_pin_free_and_lend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts in a worker's `image_pinned` stats: a buffer reused is not pinned again; one
    coming back past the spares' cap is freed; the most lent at once is kept."""
    import gc

    import workers.gpuimages as gpuimages
    from workers.gpuimages import HostArenas

    step = HostArenas.STEP
    monkeypatch.setattr(gpuimages, "SPARE_BYTES", step)  # one spare buffer of STEP bytes
    arenas = HostArenas(allocate=HostMemory)
    first, second = arenas.take(100), arenas.take(step + 1)  # STEP and 2 x STEP bytes
    assert arenas.stats() == {"allocated": 2, "freed": 0, "allocate_seconds": pytest.approx(
        arenas.allocate_seconds, abs=1e-3), "peak_lent_bytes": 3 * step}
    del first, second  # the first is kept as the spare; the second is past the cap: freed
    gc.collect()
    assert arenas.lent_bytes == 0 and arenas.freed == 1
    again = arenas.take(10)  # the spare, not a new buffer
    assert arenas.stats()["allocated"] == 2 and arenas.stats()["peak_lent_bytes"] == 3 * step
    del again
    arenas.close()
