"""``levit data shard``: an ImageFolder (``train/`` and ``val/``) written as WebDataset tar shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import UsageError


def args_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    shard = sub.add_parser("shard", help="write SRC/{train,val} as SRC's shards in DST/{train,val}/shard-NNNNNN.tar")
    shard.add_argument("src", type=Path, help="folder with train/ and val/ sub-folders (ImageFolder layout)")
    shard.add_argument("dst", type=Path, help="new folder for the shards (train/*.tar, val/*.tar, levit-shards.json)")
    shard.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    shard.add_argument("--seed", type=int, default=0, help="the training samples' shuffled order (default: 0)")


def cmd_data(args: argparse.Namespace) -> int:
    from levit.data.shards import write_shards

    if args.shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {args.shard_size}")
    written = write_shards(args.src, args.dst, shard_size=args.shard_size, seed=args.seed)
    shards = {split: len(list((args.dst / split).glob("*.tar"))) for split in written}
    summary = ", ".join(f"{split}: {n} samples in {shards[split]} shard(s)" for split, n in written.items())
    print(f"wrote {args.dst} ({summary})", file=sys.stderr)
    return 0
