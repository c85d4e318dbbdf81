"""Fine-tuning: per-update schedules, layer-wise lr decay, the trunk freeze and the shipped recipe."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from train_utils import make_dataset

import levit
from levit.errors import LeViTError
from levit.train.optim import build_optimizer, build_scheduler, scheduler_on_update
from levit.train.recipe import available_recipes, load_recipe, resolve_config
from levit.train.run import train

LR, WARMUP_LR, MIN_LR = 1e-3, 1e-5, 1e-6
UPDATES, EPOCHS, WARMUP = 4, 3, 1  # updates per epoch, epochs, warm-up epochs


def expected_rate(t: int) -> float:
    """Linear warm-up over the first WARMUP x UPDATES updates, then cosine to MIN_LR at EPOCHS x UPDATES."""
    warm, total = WARMUP * UPDATES, EPOCHS * UPDATES
    if t < warm:
        return WARMUP_LR + t * (LR - WARMUP_LR) / warm
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * t / total))


def schedule_config(**extra):
    values = dict(lr=LR, warmup_lr=WARMUP_LR, min_lr=MIN_LR, epochs=EPOCHS, warmup_epochs=WARMUP, lr_base_batch=128)
    return resolve_config(config="finetune", model="levit_tiny", data="x", **(values | extra))


def group_of(optimizer, name_of):
    """parameter name -> (its group's index, its group)."""
    return {name_of[id(p)]: (i, g) for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def test_layer_decay_rates_per_group_follow_the_schedule_at_every_update():
    model = levit.create_model("levit_tiny", num_classes=5, img_size=32)
    cfg = schedule_config(layer_decay=0.5)
    assert cfg.sched_on_updates and cfg.batch_size == 128  # the recipe's own values, lr x 128/128
    optimizer = build_optimizer(model, cfg, LR)
    scheduler = build_scheduler(optimizer, cfg, UPDATES)
    groups = group_of(optimizer, {id(p): n for n, p in model.named_parameters()})
    # stem, the stage-1 block, (shrink, block) of stages 2 and 3, heads: 7 layers, the heads at full rate
    depth = {
        "stem.0.conv.weight": 6,
        "stages.0.blocks.0.attn.qkv.linear.weight": 5,
        "stages.1.downsample.attn.kv.linear.weight": 4,
        "stages.1.blocks.0.mlp.fc1.linear.weight": 3,
        "stages.2.downsample.mlp.fc2.linear.weight": 2,
        "stages.2.blocks.0.attn.proj.linear.weight": 1,
        "head.linear.weight": 0,
        "head_dist.linear.weight": 0,
    }
    assert len(groups) == sum(1 for _ in model.parameters())  # every parameter is in a group
    for t in (0, 1, 3, 4, 5, 8, 11):
        scheduler_on_update(scheduler, t)
        for name, d in depth.items():
            _, group = groups[name]
            assert group["lr"] == pytest.approx(expected_rate(t) * 0.5**d, rel=1e-9), (t, name)
    # no weight decay on the attention bias tables and 1-D tensors, the recipe's on the weights
    assert groups["stages.0.blocks.0.attn.attention_biases"][1]["weight_decay"] == 0
    assert groups["head.bn.weight"][1]["weight_decay"] == 0
    assert groups["head.linear.weight"][1]["weight_decay"] == cfg.weight_decay


def test_per_epoch_schedule_ignores_updates_and_moves_with_epochs():
    model = levit.create_model("levit_tiny", num_classes=5, img_size=32)
    cfg = schedule_config(sched_on_updates=False, layer_decay=None)
    optimizer = build_optimizer(model, cfg, LR)
    scheduler = build_scheduler(optimizer, cfg, UPDATES)
    scheduler.step(1)
    rates = {g["lr"] for g in optimizer.param_groups}
    for t in range(1, 2 * UPDATES):
        scheduler_on_update(scheduler, t)
        assert {g["lr"] for g in optimizer.param_groups} == rates
    assert len(rates) == 1 and rates.pop() == pytest.approx(
        MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi / EPOCHS))
    )


def test_finetune_recipe_is_shipped_and_checked():
    assert "finetune" in available_recipes()
    recipe = load_recipe("finetune")
    assert recipe["reset_head"] and recipe["sched_on_updates"] and recipe["distillation"] == "none"
    assert 0 < recipe["layer_decay"] < 1 and recipe["freeze_epochs"] >= 1 and recipe["epochs"] <= 50
    for bad in ({"layer_decay": 0}, {"layer_decay": 1.5}, {"freeze_epochs": -1}):
        with pytest.raises(LeViTError, match=next(iter(bad))):
            schedule_config(**bad)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A 'pretrained' tiny model (BN statistics randomised, as a trained one has), fine-tuned for 2
    epochs with the finetune recipe, the first with the trunk frozen."""
    tmp = tmp_path_factory.mktemp("ft")
    data = make_dataset(tmp / "data", classes=3, train=6, val=2)
    torch.manual_seed(1)
    start = levit.create_model("levit_tiny", num_classes=3, distillation=False, img_size=32)
    for m in start.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    levit.save(start, tmp / "start.safetensors")
    small = dict(img_size=32, batch_size=4, workers=0, threads=1, device="cpu", progress=False, log_every=1)
    small |= dict(auto_augment=None, reprob=0.0, keep_last=5, epochs=2, warmup_epochs=1, lr=1e-2, lr_base_batch=4)
    cfg = resolve_config(
        config="finetune",
        model="levit_tiny",
        data=str(data),
        output=str(tmp / "out"),
        init_checkpoint=str(tmp / "start.safetensors"),
        **small,
    )
    with contextlib.redirect_stderr(io.StringIO()) as err:
        train(cfg)
    return start.state_dict(), tmp / "out", err.getvalue()


def test_finetune_freezes_the_trunk_then_trains_everything(finetuned):
    start, out, log = finetuned
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pth"))
    assert len(ckpts) == 2  # one per epoch (4 updates each)
    after_frozen = torch.load(ckpts[0], weights_only=True)["model"]
    after_all = torch.load(ckpts[1], weights_only=True)["model"]
    trunk = [k for k in start if not k.startswith(("head.", "head_dist."))]
    assert trunk and all(torch.equal(after_frozen[k], start[k]) for k in trunk)  # weights and BN statistics
    assert not torch.equal(after_frozen["head.linear.weight"], start["head.linear.weight"])
    params = {n for n, _ in levit.create_model("levit_tiny", num_classes=3, img_size=32).named_parameters()}
    moved = [k for k in trunk if k in params and not torch.equal(after_all[k], after_frozen[k])]
    assert len(moved) > len(trunk) // 4, "the trunk did not train after the freeze"
    assert "the trunk is frozen until epoch 1" in log and "epoch 2: the trunk is released" in log


def test_finetune_rate_moves_every_update_and_the_head_is_new(finetuned):
    _, out, log = finetuned
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in steps if r["event"] == "step"]
    assert len(rates) == 8 and len(set(rates[:4])) == 4  # warm-up over the first epoch's 4 updates
    assert rates[:4] == sorted(rates[:4]) and rates[4:] == sorted(rates[4:], reverse=True)
    # same class count as the checkpoint, yet a new head (reset_head), and the log says so
    assert "head(s) are re-initialised for 3 classes" in log
