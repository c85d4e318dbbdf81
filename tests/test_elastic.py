"""Elastic runs: torchrun restarts the workers after one is killed, and the run continues from its newest
checkpoint to the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from train_utils import env, make_dataset, step_losses, tiny_config

RUNNER = r"""
import json, os, signal, sys
import torch
from levit.train.run import resolve_config, train

cfg = resolve_config(**json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

def killer(event, info):
    if event == "step" and rank == 1 and attempt == 0 and info["global_step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a lost worker, mid-epoch, after a mid-epoch checkpoint

result = train(cfg, callbacks=[killer])
if rank == 0:
    torch.save(result.model.state_dict(), os.path.join(cfg.output, "final.pt"))
"""


def torchrun(script, cfg: dict, kill_at: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2"]
    cmd += ["--monitor-interval=0.2", str(script), json.dumps(cfg), str(kill_at)]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(tmp_path):
    data = make_dataset(tmp_path / "data", classes=3, train=8, val=2)
    (tmp_path / "runner.py").write_text(RUNNER)
    runs = {}
    for name, kill_at in (("whole", 0), ("killed", 3)):
        # 24 images / (batch 2 x 2 processes): 6 updates an epoch; killed after update 3 of epoch 1,
        # whose checkpoint (every 2 updates) is at update 2
        cfg = tiny_config(data, tmp_path / name, batch_size=2, epochs=2, checkpoint_every_steps=2, keep_last=10)
        # the fine-tuning path under DDP too: frozen trunk in epoch 1 (DDP built again when it is
        # released), per-update schedule and layer-wise decay carried through the restart
        cfg |= dict(freeze_epochs=1, sched_on_updates=True, layer_decay=0.8)
        done = torchrun(tmp_path / "runner.py", cfg, kill_at)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = done
    assert "torchrun restart 1 of this run: continuing from" in runs["killed"].stderr
    assert "ckpt-000000002.pth" in runs["killed"].stderr
    assert "epoch 2: the trunk is released" in runs["killed"].stderr
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    killed = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], killed[k]) for k in whole)  # CPU, fixed seeds: bit for bit
    # nothing lost or duplicated: the same per-step records, one per step, the same checkpoints
    assert step_losses(tmp_path / "killed") == step_losses(tmp_path / "whole")
    steps = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "step"] == list(range(1, 13))
    ckpt = {
        step: torch.load(tmp_path / "killed" / "checkpoints" / f"ckpt-{step:09d}.pth", weights_only=True)["model"]
        for step in (2, 6, 12)
    }
    trunk = [k for k in ckpt[2] if not k.startswith(("head.", "head_dist."))]
    assert all(torch.equal(ckpt[2][k], ckpt[6][k]) for k in trunk)  # frozen through epoch 1 on both ranks
    assert not all(torch.equal(ckpt[6][k], ckpt[12][k]) for k in trunk)  # trained in epoch 2
    assert not torch.equal(ckpt[2]["head.linear.weight"], ckpt[6]["head.linear.weight"])
    names = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
