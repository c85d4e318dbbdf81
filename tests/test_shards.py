"""WebDataset shards: written from an ImageFolder, read by `levit train --data` with no sample twice."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile

import pytest
import torch
from train_utils import cli, make_dataset, step_losses, tiny_config

from levit.data.datasets import collate_skip
from levit.data.shards import (
    INDEX_NAME,
    ShardFormatError,
    ShardStream,
    assign,
    batches_per_process,
    batches_taken,
    expand_pattern,
    read_index,
    tar_members,
    write_shards,
)
from levit.data.transforms import eval_transform
from levit.errors import LeViTError
from levit.train.recipe import resolve_config
from levit.train.run import train

BROKEN = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An ImageFolder (3 classes, 10 training images each, one of them corrupt) and its shards of 4."""
    tmp = tmp_path_factory.mktemp("shards")
    folder = make_dataset(tmp / "folder", classes=3, train=10, val=3)
    (folder / "train" / "c1" / "broken.png").write_bytes(BROKEN)
    written = write_shards(folder, tmp / "shards", shard_size=4)
    return folder, tmp / "shards", written


def test_written_shards_hold_every_image_with_its_class(shards):
    folder, out, written = shards
    assert written == {"train": 31, "val": 9}
    index = read_index(out)
    assert index.classes == ["c0", "c1", "c2"]
    assert [n for _, n in index.splits["train"]] == [4] * 7 + [3] and len(index.splits["val"]) == 3
    # one plain header per member: no pax headers for every reader to parse again
    with tarfile.open(index.splits["train"][0][0]) as tar:
        members = tar.getmembers()
    assert len(members) == 8 and all(not m.pax_headers and m.mtime == 0 for m in members)
    # without the index the shards are listed: same counts, classes numbered
    saved = (out / INDEX_NAME).read_text()
    (out / INDEX_NAME).unlink()
    try:
        listed = read_index(out)
    finally:
        (out / INDEX_NAME).write_text(saved)
    assert listed.splits == index.splits and listed.classes == ["0", "1", "2"]
    # the class of every sample is its folder's
    from levit.data.images import open_rgb

    want = sorted((open_rgb(p).tobytes(), int(p.parent.name[1:])) for p in (folder / "val").rglob("*.png"))
    got = list(ShardStream(index.splits["val"], None))
    assert all(not bad for _, _, bad in got)
    assert sorted((img.tobytes(), target) for img, target, _ in got) == want


def test_processes_and_workers_read_disjoint_shards_that_cover_the_split(shards):
    _, out, _ = shards
    split = read_index(out).splits["train"]
    world, workers = 2, 2
    parts = [assign(split, r, world, w, workers) for r in range(world) for w in range(workers)]
    names = [p for part in parts for p, _ in part]
    assert sorted(names) == sorted(p for p, _ in split) and len(set(names)) == len(names)
    # through real loader processes: every readable sample once per epoch, over all processes
    seen, bad = [], []
    for rank in range(world):
        stream = ShardStream(split, eval_transform(32, 1.0), rank=rank, world=world, shuffle=True, seed=3)
        stream.set_epoch(1)
        stream.replace_bad = False  # no second reading to fill the corrupt sample's place
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=collate_skip)
        for images, _, bad_samples in loader:
            seen += [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images]
            bad += bad_samples
    assert len(seen) == 30 and len(set(seen)) == 30  # 31 samples, the corrupt one skipped
    assert len(bad) == 1 and "Error" in bad[0][1] and bad[0][0].startswith("shard-")
    # every process gets the same number of full batches: the fewest any of them can make
    assert batches_per_process(split, world, workers, 2) == min(
        sum(sum(n for _, n in assign(split, r, world, w, workers)) // 2 for w in range(workers)) for r in range(world)
    )


def test_a_training_stream_makes_only_the_samples_of_the_batches_the_epoch_uses(shards):
    """Each loader worker stops after its share of the epoch's batches (taken from the workers in
    turn) instead of decoding and augmenting samples its loader drops."""
    assert batches_taken([2, 2], 3) == [2, 1] and batches_taken([3, 1], 4) == [3, 1]
    assert batches_taken([1, 3], 4) == [1, 3] and batches_taken([5, 5], 0) == [0, 0]
    _, out, _ = shards
    split = read_index(out).splits["train"]  # shards of 4: rank 0's workers make 2 and 2 batches, rank 1's 2 and 1
    assert batches_per_process(split, 2, 2, 4) == 3
    stream = ShardStream(split, eval_transform(32, 1.0), rank=0, world=2, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, drop_last=True, collate_fn=collate_skip)
    assert len(list(loader)) == 4  # unlimited: every full batch of rank 0's 16 samples
    stream.limit_to(3, 4, 2)
    assert stream.take == [8, 4]
    batches = list(loader)
    assert len(batches) == 3 and all(len(images) == 4 for images, _, _ in batches)  # ends by itself


def test_training_on_shards_skips_and_reports_the_corrupt_sample(shards, tmp_path):
    _, out, _ = shards
    cfg = resolve_config(**tiny_config(out, tmp_path / "run", mixup=0.0, cutmix=0.0, max_bad_fraction=0.2))
    result = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_images"] == 9 for r in epochs)
    # 31 samples, batch 4, one process, no workers: 7 full batches an epoch
    assert [r["step"] for r in lines if r["event"] == "step"] == list(range(1, 15))
    assert lines[-1]["skipped_images"] == 1 and ".tar:" in result.skipped_images[0]
    assert result.model.class_names == ["c0", "c1", "c2"]


def test_shard_cli_and_its_errors(tmp_path):
    folder = make_dataset(tmp_path / "folder", classes=2, train=3, val=2)
    done = cli("data", "shard", folder, tmp_path / "s", "--shard-size", "2")
    assert done.returncode == 0, done.stderr
    assert "train: 6 samples in 3 shard(s)" in done.stderr and (tmp_path / "s" / "val" / "shard-000000.tar").is_file()
    again = cli("data", "shard", folder, tmp_path / "s")
    assert again.returncode == 1 and "not empty" in again.stderr
    assert cli("data", "shard", folder, tmp_path / "t", "--shard-size", "0").returncode == 2
    missing = cli("data", "shard", tmp_path / "nope", tmp_path / "u")
    assert missing.returncode == 1 and "nope" in missing.stderr
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(LeViTError, match=r"no \.tar shards"):
        read_index(tmp_path / "empty")


def test_shards_appear_whole_or_not_at_all_and_a_pipe_among_the_images_is_skipped(tmp_path, monkeypatch):
    """DST gets every shard and the index, or nothing: a folder of tar files is data to every reader,
    so a run stopped midway (an exception, SIGTERM) leaves neither a DST it made nor its partial folder.
    A pipe named like an image (opening it would wait for a writer forever) is skipped and named."""
    import os
    import signal
    import threading

    import webdataset

    folder = make_dataset(tmp_path / "folder", classes=2, train=3, val=2)
    os.mkfifo(folder / "val" / "c1" / "pipe.png")
    dst = tmp_path / "given"
    dst.mkdir()  # an empty folder given as DST is filled
    result = {}

    def shard() -> None:
        result["cli"] = cli("data", "shard", folder, dst, "--shard-size", "2")

    worker = threading.Thread(target=shard, daemon=True)  # a hang leaves only a daemon thread behind
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "opening a pipe blocked"
    done = result["cli"]
    assert done.returncode == 0, done.stderr
    pipe = "not a regular file (a pipe, socket or device), not an image file"
    assert f"warning: skipped {folder / 'val' / 'c1' / 'pipe.png'} ({pipe})" in done.stderr
    assert "val: 4 samples in 2 shard(s)" in done.stderr
    assert [n for _, n in read_index(dst).splits["val"]] == [2, 2]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["folder", "given"]

    write, calls = webdataset.ShardWriter.write, []

    def stopping(stop):  # the third sample stops the run, after two were written
        def patched(self, sample):
            calls.append(1)
            if len(calls) % 3 == 0:
                stop()
            write(self, sample)

        return patched

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(webdataset.ShardWriter, "write", stopping(interrupt))
    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, tmp_path / "cut", shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (dst / "inner").mkdir()
    with pytest.raises(KeyboardInterrupt):  # a DST given empty stays as it was given
        write_shards(folder, dst / "inner", shard_size=2)
    assert sorted(p.name for p in dst.iterdir()) == ["inner", INDEX_NAME, "train", "val"]
    assert list((dst / "inner").iterdir()) == []
    (dst / "inner").rmdir()
    calls.clear()

    def unhandled(*_):  # stands in for the default action (the end of the process), which a test must not take
        raise AssertionError("levit data shard left SIGTERM to the process's handler")

    monkeypatch.setattr(webdataset.ShardWriter, "write", stopping(lambda: os.kill(os.getpid(), signal.SIGTERM)))
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        stopped = cli("data", "shard", folder, tmp_path / "term")
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the command's own handler went with it
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.returncode == 128 + signal.SIGTERM and len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # a given DST keeps only what a kill -9 could not clean: the hidden partial folder, named when met
    (tmp_path / "killed" / ".partial-99999" / "train").mkdir(parents=True)
    with pytest.raises(LeViTError, match=r"not empty \(\.partial-99999 is what a stopped run left: remove it\)"):
        write_shards(folder, tmp_path / "killed")


class InterruptError(Exception):
    pass


def test_resume_inside_an_epoch_on_shards_continues_with_the_same_samples(shards, tmp_path):
    """A run stopped after update 5 of 7 and resumed from its checkpoint at update 3 ends with the
    uninterrupted run's per-step losses and weights, bit for bit: the skipped batches are the ones
    already trained on, and every sample keeps its augmentation."""
    _, out, _ = shards
    extra = dict(checkpoint_every_steps=3, max_bad_fraction=0.2)
    whole = train(resolve_config(**tiny_config(out, tmp_path / "whole", **extra)))

    def stop(event: str, info: dict) -> None:
        if event == "step" and info["global_step"] == 5:
            raise InterruptError

    cfg = resolve_config(**tiny_config(out, tmp_path / "cut", **extra))
    with pytest.raises(InterruptError):
        train(cfg, callbacks=[stop])
    resumed = train(cfg, resume="auto")
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "whole")
    want, got = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_truncated_shard_is_reported_and_training_keeps_its_batches(shards, tmp_path):
    """The samples a truncated shard lost are reported (against the bad-sample budget) and their
    places filled by reading the worker's shards again, so every process keeps its batch count;
    evaluation reports them and counts the rest."""
    _, out, _ = shards
    shutil.copytree(out, tmp_path / "cut")
    first = sorted((tmp_path / "cut" / "train").glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:2048])  # 4 samples promised, not one of them whole
    split = read_index(tmp_path / "cut").splits["train"]
    got = list(ShardStream(split, None, shuffle=True))
    bad = [b for _, _, reported in got for b in reported]
    assert len(got) == 31 and all(img is not None for img, _, _ in got)  # the index's count, all good
    assert len(bad) == 4 and all(name.startswith(first.name) for name, _ in bad)  # each lost sample once
    assert "truncated" in bad[-1][1]
    evaluated = list(ShardStream(split, None))
    reported = [b for _, _, r in evaluated for b in r]
    assert sum(img is not None for img, _, _ in evaluated) + len(reported) == 31  # each sample counted or reported


def test_a_pipe_named_like_a_shard_is_a_broken_shard_not_a_hang(shards, tmp_path):
    """A FIFO with no writer in a shard's place (opening it for reading would wait forever): listed
    without an index, one line naming it; read through the saved index, its samples are reported
    missing and the other shards read, in training and evaluation."""
    import os
    import threading

    _, out, _ = shards
    shutil.copytree(out, tmp_path / "piped")
    first = sorted((tmp_path / "piped" / "train").glob("*.tar"))[0]
    first.unlink()
    os.mkfifo(first)
    split, got = read_index(tmp_path / "piped").splits["train"], {}

    def read() -> None:
        got["train"] = list(ShardStream(split, None, shuffle=True))
        got["eval"] = list(ShardStream(split, None))
        (tmp_path / "piped" / INDEX_NAME).unlink()
        with pytest.raises(LeViTError, match=rf"{first.name} is not a readable tar shard \(not a regular file"):
            read_index(tmp_path / "piped")
        got["listed"] = True

    worker = threading.Thread(target=read, daemon=True)  # a hang leaves only a daemon thread behind
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "opening a pipe blocked"
    assert got.pop("listed")
    for mode, rows in got.items():
        reported = [b for _, _, r in rows for b in r]
        assert [name for name, _ in reported] == [f"{first.name}:missing-{i}" for i in range(4)], mode
        assert "not a regular file" in reported[0][1], reported[0]
        assert sum(img is not None for img, _, _ in rows) == (31 if mode == "train" else 27), mode


def test_brace_patterns_train_as_the_shard_folder(shards, tmp_path):
    """``train_shards``/``val_shards`` brace patterns (no --data) name the same shards as the folder:
    the same per-step losses and weights; a file the pattern names but that does not exist, one line."""
    _, out, _ = shards
    assert [p.name for p in expand_pattern(out / "train" / "shard-{000000..000007}.tar")] == [
        f"shard-{i:06d}.tar" for i in range(8)
    ]
    extra = dict(epochs=1, max_bad_fraction=0.2)
    folder = train(resolve_config(**tiny_config(out, tmp_path / "folder", **extra)))
    patterns = dict(
        train_shards=f"{out}/train/shard-{{000000..000007}}.tar", val_shards=f"{out}/val/shard-{{0..2}}.tar"
    )
    with pytest.raises(LeViTError, match=r"shard-0\.tar does not exist"):  # {0..2} is not zero-padded
        train(resolve_config(**tiny_config(None, tmp_path / "typo", **extra) | patterns | {"data": None}))
    patterns["val_shards"] = f"{out}/val/shard-{{000000,000001,000002}}.tar"
    got = train(resolve_config(**tiny_config(None, tmp_path / "pattern", **extra) | patterns | {"data": None}))
    assert step_losses(tmp_path / "pattern") == step_losses(tmp_path / "folder") and got.last["n"] == 9
    a, b = folder.model.state_dict(), got.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and got.model.class_names == ["c0", "c1", "c2"]
    with pytest.raises(LeViTError, match="go together"):
        resolve_config(**tiny_config(None, tmp_path / "x") | {"data": None, "train_shards": patterns["train_shards"]})


def test_eval_on_shards_gives_the_numbers_of_their_image_folder(shards, tmp_path):
    """``levit eval --data`` on the shards written from an ImageFolder (their folder, its val/, or a
    brace pattern) gives that folder's top-1, top-5, loss and count exactly."""
    import levit

    folder, out, _ = shards
    ckpt = levit.save(levit.create_model("levit_tiny", num_classes=3, img_size=32), tmp_path / "m.safetensors")
    results = []
    for data in (folder / "val", out, out / "val", f"{out}/val/shard-{{000000..000002}}.tar"):
        done = cli("eval", "--data", data, "-c", ckpt, "--workers", "0", "--output", tmp_path / "e.json")
        assert done.returncode == 0, done.stderr
        results.append({k: v for k, v in json.loads((tmp_path / "e.json").read_text()).items() if k != "data"})
    assert results[0]["n"] == 9 and all(r == results[0] for r in results[1:])
    missing = cli("eval", "--data", f"{out}/val/shard-{{000000..000003}}.tar", "-c", ckpt)
    assert missing.returncode == 1 and "shard-000003.tar does not exist" in missing.stderr


def test_teacher_cache_built_from_brace_patterns_replays_the_soft_teacher_on_the_shard_folder(shards, tmp_path):
    """``levit data teacher-cache`` on ``train_shards``/``val_shards`` patterns keeps every logit (``--topk``
    = the classes); a run on the same shards by their folder reads it with the live teacher's losses and
    weights, bit for bit; a cache read with another loader worker count (other views per batch) is refused."""
    import levit

    _, out, _ = shards
    torch.manual_seed(5)
    teacher = levit.save(levit.create_model("levit_tiny", num_classes=3, img_size=32), tmp_path / "t.safetensors")
    soft = dict(epochs=1, max_bad_fraction=0.2, distillation="soft", teacher_checkpoint=str(teacher), threads=1)
    live = train(resolve_config(**tiny_config(out, tmp_path / "live", **soft)))
    recipe = ["img_size=32", "batch_size=4", "epochs=1", "total_batch=null", "workers=0", "threads=1"]
    recipe += ["distillation=soft", "max_bad_fraction=0.2", f"train_shards={out}/train/shard-{{000000..000007}}.tar"]
    recipe += [f"val_shards={out}/val/shard-{{000000..000002}}.tar", "-m", "levit_tiny", "--topk", "3"]
    done = cli("data", "teacher-cache", tmp_path / "t.cache", *recipe, "--teacher-checkpoint", teacher)
    assert done.returncode == 0, done.stderr
    cache = str(tmp_path / "t.cache")
    cached = train(resolve_config(**tiny_config(out, tmp_path / "cached", teacher_cache=cache, **soft)))
    losses = step_losses(tmp_path / "live")
    assert step_losses(tmp_path / "cached") == losses and len(losses) == 7
    a, b = live.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LeViTError, match=r"made for another run \(data:"):
        train(resolve_config(**tiny_config(out, tmp_path / "workers", teacher_cache=cache, workers=2, **soft)))


def tarfile_members(path) -> list[tuple[str, bytes]]:
    """The regular files of a tar as webdataset reads them with ``tarfile`` (streaming, any compression)."""
    with tarfile.open(path, "r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def webdataset_samples(urls: list[str], reader: str) -> list[dict]:
    """The samples of ``urls`` through webdataset's ``tarfile_to_samples`` or the stream's own reader,
    then a seeded shuffle buffer, as :class:`ShardStream` reads them."""
    import webdataset as wds

    from levit.data.shards import _tar_samples

    errors = []
    stage = wds.tarfile_to_samples if reader == "tarfile" else lambda handler: lambda s: _tar_samples(s, handler)
    samples = wds.DataPipeline(
        wds.SimpleShardList(urls),
        stage(handler=lambda e: errors.append(e) or True),
        wds.shuffle(10, initial=5, rng=random.Random(3)),
    )
    return list(samples), errors


def test_the_shard_reader_gives_tarfiles_members_and_webdatasets_samples(shards, tmp_path, monkeypatch):
    """The stream reads tars without ``tarfile`` (its ~60 us a member is what made shards slower than
    files): the same members, names and bytes, on the shards ``levit data shard`` writes and on tars
    ``tarfile`` writes with long names (pax records, GNU long names, ustar prefixes), links and folders
    among the files, compressed or not; grouped and shuffled, the same samples in the same order."""
    _, out, _ = shards
    urls = [str(p) for p, _ in read_index(out).splits["train"]]
    assert all(list(tar_members(u)) == tarfile_members(u) for u in urls)
    got, errors = webdataset_samples(urls, "ours")
    assert (got, errors) == webdataset_samples(urls, "tarfile") and len(got) == 31
    with monkeypatch.context() as m:  # and it is the stream's reader
        m.setattr(tarfile, "open", None)
        assert sum(img is not None for img, _, _ in ShardStream(read_index(out).splits["val"], None)) == 9
    deep = "long-folder-name/" * 7  # 119 characters: past the 100 of a ustar name field
    for fmt, suffix in [(tarfile.PAX_FORMAT, ""), (tarfile.GNU_FORMAT, ""), (tarfile.USTAR_FORMAT, ""), (0, "gz")]:
        path = tmp_path / f"{fmt}.tar{'.' + suffix if suffix else ''}"
        with tarfile.open(path, f"w:{suffix}", format=fmt) as tar:
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for i, (name, data) in enumerate(
                [("a.png", b"png" * 200), ("a.cls", b"1"), ("b.jpg", b""), ("b.cls", b"0")]
            ):
                member = tarfile.TarInfo(deep + name)
                member.size, member.mtime = len(data), 1.5 if i == 1 else 0  # a fraction: a pax record
                tar.addfile(member, io.BytesIO(data))
                link = tarfile.TarInfo(f"link{i}")
                link.type, link.linkname = tarfile.SYMTYPE, deep if fmt != tarfile.USTAR_FORMAT else "a"
                tar.addfile(link)
        members = list(tar_members(path))
        assert members == tarfile_members(path) and members[0][0] == deep + "a.png"
        got, errors = webdataset_samples([str(path)], "ours")
        assert (got, errors) == webdataset_samples([str(path)], "tarfile") and len(got) == 2 and not errors
        assert {s["__key__"] for s in got} == {deep + "a", deep + "b"}


def test_a_corrupt_or_cut_shard_ends_where_it_breaks_and_its_lost_samples_are_reported(shards, tmp_path):
    """A header whose checksum is wrong, a header or a member's data cut short: the members before
    it are read, the rest of the shard is not, and the samples the index promised are reported."""
    _, out, _ = shards
    shutil.copytree(out, tmp_path / "bad")
    first = sorted((tmp_path / "bad" / "val").glob("*.tar"))[0]  # 4 samples, none of them broken
    whole = first.read_bytes()
    offsets = [0]  # each member's header: 512 bytes, then its data padded to 512
    for _, data in tarfile_members(first):
        offsets.append(offsets[-1] + 512 + -(-len(data) // 512) * 512)
    third = offsets[4]  # the header of the third sample's first member (after two samples of two members)
    corrupt = bytearray(whole)
    corrupt[third + 5] ^= 0x01  # one bit of the member's name
    first.write_bytes(bytes(corrupt))
    members = []
    with pytest.raises(ShardFormatError, match=f"header at byte {third}: bad checksum"):
        members += tar_members(first)
    assert members == tarfile_members(out / "val" / first.name)[:4]
    evaluated = list(ShardStream(read_index(tmp_path / "bad").splits["val"], None))
    reported = [b for _, _, r in evaluated for b in r]
    assert sum(img is not None for img, _, _ in evaluated) == 9 - 2
    assert [name for name, _ in reported] == [f"{first.name}:missing-0", f"{first.name}:missing-1"]
    assert "bad checksum" in reported[0][1]
    for cut, why, before in [(third + 100, "truncated header", 4), (offsets[5] + 600, "cut short: 88 of", 5)]:
        first.write_bytes(whole[:cut])
        members = []
        with pytest.raises(ShardFormatError, match=why):
            members += tar_members(first)
        assert len(members) == before
    first.write_bytes(whole[:third])  # no end-of-archive blocks: the end of the file ends it, as tarfile's
    assert list(tar_members(first)) == tarfile_members(out / "val" / first.name)[:4]
