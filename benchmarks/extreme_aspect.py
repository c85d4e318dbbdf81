"""What an extreme aspect ratio costs `levit.data.preprocess.Preprocess`: a 1 x 8000 PNG with the
bound (`Preprocess.bounded`, the default) and without it, beside a 500x375 image, one thread.

    python benchmarks/extreme_aspect.py

Prints the milliseconds and the growth of this process's peak memory for each (docs/predict.md).
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

from levit.data.preprocess import Preprocess


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        strip, photo = Path(tmp) / "strip.png", Path(tmp) / "photo.png"
        Image.new("RGB", (8000, 1), (120, 130, 140)).save(strip)
        Image.new("RGB", (500, 375), (1, 2, 3)).save(photo)
        pre = Preprocess(224)
        pre(photo)  # imports and first-call costs out of the way
        runs = [
            ("500x375", lambda: pre(photo)),
            ("1x8000, bounded", lambda: pre(strip)),
            ("1x8000, not bounded", lambda: pre.transform(pre.decode(strip))),  # last: it grows the peak
        ]
        for name, run in runs:
            before, t = peak_mb(), time.perf_counter()
            run()
            print(f"{name}: {(time.perf_counter() - t) * 1e3:.1f} ms, peak memory +{peak_mb() - before:.0f} MB")


if __name__ == "__main__":
    main()
