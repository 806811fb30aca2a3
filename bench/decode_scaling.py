"""JPEG decoding on 1..N threads of one process: how each way of decoding scales with threads.

    python -m bench.decode_scaling [--threads 1,4,8,16] [--seconds 1.5]

The bench's own photo-like JPEGs (`bench.gpu_inputs`): 224x224 (at the model's size) and
500x375 photos resized to 224. For each, images/s and the speed-up over one thread of:
- `job CPU path`: `workers.images.load_image` as the actor's threads run it (libjpeg-turbo at a
  reduced DCT scale, then Pillow's resize and crop for photos; the array cropped for 224 px);
- `libjpeg-turbo only`: simplejpeg's decode alone at full scale (what a thread can do when
  nothing else holds the GIL), and at the scale the job's path picks.
Threads that stop scaling while the CPUs are not all busy queue on the GIL.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def jpegs(width: int, height: int, count: int) -> list[bytes]:
    from PIL import Image

    from bench.gpu_inputs import photo

    out = []
    for seed in range(count):
        buffer = io.BytesIO()
        Image.fromarray(photo(width, height, seed)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def rate(work: Callable[[bytes], object], images: list[bytes], threads: int, seconds: float
         ) -> float:
    """Images/s of `work` over `images` on `threads` threads, for about `seconds` (best of 3)."""
    def chunk(part: list[bytes]) -> None:
        for data in part:
            work(data)

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        parts = [images[i::threads] for i in range(threads)]
        list(pool.map(chunk, parts))  # warm-up
        for _ in range(3):
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                list(pool.map(chunk, parts))
                done += len(images)
            best = max(best, done / (time.perf_counter() - t0))
    return best


def main() -> None:
    import simplejpeg

    from workers.images import load_image, resized_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="e.g. 1,4,8,16 (default: 1, 4, .., CPUs)")
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else \
        sorted({1, *(t for t in (4, 8) if t < cpus), cpus})
    print(f"{cpus} CPUs; images/s (speed-up over 1 thread)")
    print("| images | decode | " + " | ".join(f"{t} thr" for t in threads) + " |")
    print("|---|---|" + "---:|" * len(threads))
    for width, height in ((224, 224), (500, 375)):
        images = jpegs(width, height, 8 * max(threads))
        new_w, new_h = resized_size(width, height, 224)
        ways: dict[str, Callable[[bytes], object]] = {
            "job CPU path": lambda d: load_image(d, "RGB", (224, 224), 224, True),
            "libjpeg-turbo only, full scale": lambda d: simplejpeg.decode_jpeg(d, "RGB"),
        }
        if (new_w, new_h) != (width, height):
            ways["libjpeg-turbo only, the job's scale"] = functools.partial(
                simplejpeg.decode_jpeg, colorspace="RGB", min_height=new_h, min_width=new_w)
        for name, work in ways.items():
            rates = [rate(work, images, t, args.seconds) for t in threads]
            cells = " | ".join(f"{r:,.0f} ({r / rates[0]:.1f}x)" for r in rates)
            print(f"| {width}x{height} -> 224 | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
