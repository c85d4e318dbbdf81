"""Distributed runs on two gloo processes: one DDP run (every rank ends with the same weights, the
validation split read once across ranks, rank 0 alone logs and saves), and its twin under torchrun's
elastic mode with one worker killed mid-epoch, which torchrun restarts and which ends with the same
weights, records and checkpoints as the uninterrupted run. One pair of runs checks both, so that the
suite starts the interpreters once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import env, make_dataset, step_losses, tiny_config

BROKEN = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10

RUNNER = r"""
import faulthandler, json, os, signal, sys
faulthandler.dump_traceback_later(150, exit=True)  # a hung collective ends the worker, with its stack
import torch
from levit.train.evaluate import evaluate_folder
from levit.train.run import resolve_config, train

cfg = resolve_config(**json.loads(sys.argv[1]))
kill_at, out = int(sys.argv[2]), sys.argv[3]
rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

def killer(event, info):
    if event == "step" and rank == 1 and attempt == 0 and info["global_step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a lost worker, mid-epoch, after a mid-epoch checkpoint

ev = None
if kill_at:  # under torchrun: train() starts the group (and again on each restart)
    res = train(cfg, callbacks=[killer])
else:
    # one group for training and levit eval's library path: a group the caller started is used and
    # left alone (one process starting a second group after destroying the first races on the port)
    torch.distributed.init_process_group("gloo")
    res = train(cfg)
    assert torch.distributed.is_initialized()
    ev = evaluate_folder(res.model, cfg.data + "/val", batch_size=2, workers=0, device="cpu")
    assert torch.distributed.is_initialized()
    torch.distributed.destroy_process_group()
torch.save({"sd": res.model.state_dict(), "n": res.last["n"], "top1": res.last["top1"], "eval": ev},
           os.path.join(out, f"rank{rank}.pt"))
"""


def launch(script: Path, *args: str, nproc: int = 2, timeout: int = 180) -> list[subprocess.CompletedProcess]:
    """Start ``nproc`` ranks with the environment torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), without torchrun's launcher process (one interpreter start less), each rank's
    stderr kept apart."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        e = env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc)}
        e |= {"LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(script), *args]
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            o, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank timed out after {timeout}s")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, o, err))
    return out


def torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2"]
    cmd += ["--monitor-interval=0.2", str(script), *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def test_ddp_ranks_agree_and_a_killed_worker_restarted_by_torchrun_ends_as_if_uninterrupted(tmp_path):
    data = make_dataset(tmp_path / "data", classes=3, train=8, val=3)
    (data / "val" / "c0" / "c0_000.png").unlink()  # 8 val images left
    (data / "val" / "c2" / "c2_000.png").write_bytes(BROKEN)  # 7 readable: shards of 4 and 3 minus the broken one
    (tmp_path / "runner.py").write_text(RUNNER)
    # 24 images / (batch 2 x 2 processes): 6 updates an epoch; the killed run loses rank 1 after update
    # 3 of epoch 1, whose checkpoint (every 2 updates) is at update 2. Every random stream is on
    # (Mixup/CutMix, drop path), and the fine-tuning path: frozen trunk in epoch 1 (DDP built again when
    # it is released), per-update schedule and layer-wise decay carried through the restart
    cfg = dict(batch_size=2, epochs=2, checkpoint_every_steps=2, keep_last=10, mixup=0.8, cutmix=1.0)
    cfg |= dict(drop_path=0.1, max_bad_fraction=0.5, freeze_epochs=1, sched_on_updates=True, layer_decay=0.8)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    ranks = launch(tmp_path / "runner.py", json.dumps(tiny_config(data, whole, **cfg)), "0", str(whole))
    for r in ranks:
        assert r.returncode == 0, r.stderr[-3000:]
    done = torchrun(tmp_path / "runner.py", json.dumps(tiny_config(data, killed, **cfg)), "3", str(killed))
    assert done.returncode == 0, done.stderr[-3000:]

    # the DDP run: parameters AND BatchNorm statistics equal on both ranks
    a, b = (torch.load(whole / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert a["sd"].keys() == b["sd"].keys()
    assert all(torch.equal(a["sd"][k], b["sd"][k]) for k in a["sd"])
    assert a["n"] == b["n"] == 7 and a["top1"] == b["top1"]  # every readable val image once across ranks
    # levit eval's library path under DDP: the same counts, the broken image reported on every rank
    for ev in (a["eval"], b["eval"]):
        assert ev["n"] == 7 and [Path(p).name for p, _ in ev["skipped"]] == ["c2_000.png"]
        assert ev["top1"] == a["top1"]
    # logging and checkpoints from rank 0 only: one record per step
    assert ranks[0].stderr.count("training levit_tiny") == 1 and "training" not in ranks[1].stderr
    assert "unreadable validation image" in ranks[0].stderr
    assert "unreadable validation image" not in ranks[1].stderr
    state = torch.load(whole / "checkpoints" / "ckpt-000000012.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert torch.equal(state["model"]["head.linear.weight"], a["sd"]["head.linear.weight"])

    # the killed twin: restarted from its newest checkpoint, to the same weights bit for bit (CPU, seeds)
    assert "torchrun restart 1 of this run: continuing from" in done.stderr
    assert "ckpt-000000002.pth" in done.stderr
    assert "epoch 2: the trunk is released" in done.stderr
    k0, k1 = (torch.load(killed / f"rank{i}.pt", weights_only=False)["sd"] for i in (0, 1))
    assert all(torch.equal(a["sd"][k], k0[k]) and torch.equal(k0[k], k1[k]) for k in a["sd"])
    # nothing lost or duplicated: the same per-step records, one per step, the same checkpoints
    assert step_losses(killed) == step_losses(whole)
    steps = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "step"] == list(range(1, 13))
    ckpt = {
        step: torch.load(killed / "checkpoints" / f"ckpt-{step:09d}.pth", weights_only=True)["model"]
        for step in (2, 6, 12)
    }
    trunk = [k for k in ckpt[2] if not k.startswith(("head.", "head_dist."))]
    assert all(torch.equal(ckpt[2][k], ckpt[6][k]) for k in trunk)  # frozen through epoch 1 on both ranks
    assert not all(torch.equal(ckpt[6][k], ckpt[12][k]) for k in trunk)  # trained in epoch 2
    assert not torch.equal(ckpt[2]["head.linear.weight"], ckpt[6]["head.linear.weight"])
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (whole / "checkpoints").iterdir())
