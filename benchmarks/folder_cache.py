"""First and second load of an image-folder domain: decoding in worker processes and caching the
8-bit pixels (``mergeq.data.decoded``), against decoding every image lazily once (what every pass
over the data cost before the cache).

Writes ``--images`` random-texture JPEGs of ``--pixels`` x ``--pixels`` (PIL, quality 90) into
``--root``/D/<class>/ unless they are there, then times, each in a fresh process: the first
``load_data`` with an empty cache dir (decode + write), the second (read back), and one lazy
pass over the same images without a cache; at ``--size`` (the crop) 224 and 32.

    PYTHONPATH=src python benchmarks/folder_cache.py --root /tmp/mergeq-1000 --images 1000
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
from mergeq.data import load_data
from mergeq.data_utils import iter_batches
root, size, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = {"kind": "folder", "root": root, "source": "D", "targets": [], "image_size": size, "test_fraction": 0.2}
t0 = time.perf_counter()
bench = load_data(spec, cache_dir=None if cache == "-" else cache)
n = sum(len(x) for split in (bench.source.train, bench.source.test) for x in iter_batches(split, 256))
print(json.dumps({"seconds": time.perf_counter() - t0, "images": n}))
"""


def make_domain(root: Path, images: int, pixels: int, classes: int = 10) -> None:
    from PIL import Image

    if (root / "D").is_dir():
        return
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "D" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (pixels // 8, pixels // 8, 3), dtype=np.uint8)  # smooth texture, JPEG-like size
        img = Image.fromarray(low).resize((pixels, pixels), Image.BICUBIC)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def timed(root: Path, size: int, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(size), cache], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--pixels", type=int, default=224)
    args = ap.parse_args()
    make_domain(args.root, args.images, args.pixels)
    rows = []
    for size in (224, 32):
        cache = tempfile.mkdtemp(prefix="mergeq-cache-")
        try:
            first, second = timed(args.root, size, cache), timed(args.root, size, cache)
            lazy = timed(args.root, size, "-")
            mb = sum(p.stat().st_size for p in Path(cache, "images").glob("*")) / 2**20
        finally:
            shutil.rmtree(cache)
        rows.append({"size": size, "first": first["seconds"], "second": second["seconds"],
                     "lazy_pass": lazy["seconds"], "images": first["images"], "cache_mb": mb})
        print(json.dumps(rows[-1]))
    print("| crop | images | first load (decode + cache) s | second load s | one lazy pass s | cache MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['images']} | {r['first']:.1f} | {r['second']:.2f} | {r['lazy_pass']:.1f} "
              f"| {r['cache_mb']:.0f} |")


if __name__ == "__main__":
    main()
