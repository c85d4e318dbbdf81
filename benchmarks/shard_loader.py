"""A training epoch's data loading on CPU: WebDataset shards against the ImageFolder they were written
from, through the loaders `levit train` builds (`levit.data.datasets.build_loaders` and
`levit.data.shards.build_shard_loaders`: decoding, the recipe's augmentation, collation), with no
model, so only the reading differs.

    python benchmarks/shard_loader.py                     # the bundled digits, the digits recipe
    python benchmarks/shard_loader.py --workers 2 --rounds 5
    python benchmarks/shard_loader.py --photos 3000 --rounds 3   # photo-like 500x375 JPEGs, the paper's recipe

The digits are written as an ImageFolder and as shards (`levit.data.shards.write_shards`, 200 samples
a shard) in a temporary folder; each round times one epoch of each loader in turn (alternating, so a
busy machine weighs on both alike, and each loader first every other round); reported: the median
seconds of each, their ratio, the cost of reading one tar member (the training shards read through
with `levit.data.shards.tar_members`, and with `tarfile` as webdataset reads them) and the machine's
load average (1 minute) before and after the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from levit.data.datasets import build_loaders
from levit.data.digits import make_digits_folder
from levit.data.shards import assign, build_shard_loaders, read_index, tar_members, write_shards
from levit.train.recipe import resolve_config


def epoch_seconds(data, epoch: int) -> tuple[float, int]:
    """Seconds to iterate one training epoch of ``data`` and the images it gave."""
    data.sampler.set_epoch(epoch)
    start, n = time.perf_counter(), 0
    for images, _, _ in data.train_loader:
        n += images.shape[0]
    return time.perf_counter() - start, n


def member_microseconds(shards: list[Path], reader: str) -> float:
    """Microseconds to read one member of ``shards`` (median of 5 passes over all of them), with
    ``tar_members`` or with ``tarfile`` as webdataset streams a tar."""
    import tarfile

    def members(path: Path):
        if reader == "tar_members":
            yield from tar_members(path)
            return
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if m.isreg():
                    yield m.name, tar.extractfile(m).read()

    passes = []
    for _ in range(5):
        start = time.perf_counter()
        n = sum(1 for path in shards for _ in members(path))
        passes.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(passes)


def write_photos(root: Path, n: int, classes: int = 10) -> Path:
    """An ImageFolder (``train/`` and ``val/``, one val image per ten) of ``n`` photo-like 500x375
    JPEGs (quality 90, about the size of an ImageNet photo), written 100 at a time."""
    from PIL import Image

    from levit.data.synthetic import photo_like_images

    for start in range(0, n, 100):
        batch = photo_like_images(min(100, n - start), (375, 500), seed=start, mean=(0, 0, 0), std=(1, 1, 1))
        pixels = (batch.permute(0, 2, 3, 1) * 255).round().byte().numpy()
        for i, px in enumerate(pixels, start):
            split = "val" if i % 10 == 9 else "train"
            folder = root / split / f"c{(i // 10) % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="loader processes (the digits recipe: 0)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--photos", type=int, default=0, help="N photo-like JPEGs and the paper's recipe instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.photos:
            folder, recipe = write_photos(Path(tmp) / "photos", args.photos), {}
        else:
            folder, recipe = make_digits_folder(Path(tmp) / "digits"), {"config": "digits"}
        write_shards(folder, Path(tmp) / "shards", shard_size=args.shard_size)
        loaders = {
            kind: build(resolve_config(**recipe, data=str(root), workers=args.workers), root)
            for kind, build, root in (
                ("imagefolder", build_loaders, folder),
                ("shards", build_shard_loaders, Path(tmp) / "shards"),
            )
        }
        times: dict[str, list[float]] = {kind: [] for kind in loaders}
        images: dict[str, int] = {}
        load = os.getloadavg()[0]
        for r in range(args.rounds):
            # alternating, and each loader first every other round: neither is always the one timed
            # after the other's worker processes exit
            for kind, data in list(loaders.items())[:: 1 if r % 2 == 0 else -1]:
                seconds, images[kind] = epoch_seconds(data, r)
                times[kind].append(seconds)
        loads = f"{load:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)"
        for kind, ts in times.items():
            print(
                f"{kind:12s} {statistics.median(ts):.3f} s/epoch ({images[kind]} images/epoch, median of {args.rounds})"
            )
        ratio = statistics.median(times["shards"]) / statistics.median(times["imagefolder"])
        print(f"shards / imagefolder: {ratio:.2f}")
        if args.workers > 1:  # a worker reads whole shards: the one with the most samples ends the epoch
            split = read_index(Path(tmp) / "shards").splits["train"]
            per = [sum(n for _, n in assign(split, 0, 1, w, args.workers)) for w in range(args.workers)]
            print(f"training samples per loader worker: {', '.join(map(str, per))}")
        shards = sorted((Path(tmp) / "shards" / "train").glob("*.tar"))
        costs = {reader: member_microseconds(shards, reader) for reader in ("tarfile", "tar_members")}
        print("one tar member: " + ", ".join(f"{reader} {us:.1f} us" for reader, us in costs.items()))
        print(f"load average (1 min) of the rounds: {loads}")


if __name__ == "__main__":
    main()
