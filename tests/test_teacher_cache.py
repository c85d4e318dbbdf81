"""The teacher cache: built once, read by hard distillation (and soft, with every logit kept) with the live
teacher's losses, bit for bit; soft from the top k logits close, by TinyViT's rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from train_utils import cli, hf_dataset, make_dataset, step_losses, tiny_config

import levit
from levit.errors import LeViTError
from levit.train.distill import distillation_loss
from levit.train.recipe import resolve_config
from levit.train.run import train
from levit.train.teacher_cache import ARRAYS, _soft_arrays, _store_logits, build_teacher_cache, rebuild_logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tc")
    data = make_dataset(tmp / "data", classes=3, train=6, val=2)
    torch.manual_seed(5)
    teacher = levit.create_model("levit_tiny", num_classes=3, img_size=32, distillation=False)
    levit.save(teacher, tmp / "teacher.safetensors")
    values = dict(distillation="hard", teacher_checkpoint=str(tmp / "teacher.safetensors"), drop_path=0.1)
    return tmp, data, values


def test_cached_teacher_gives_the_live_teachers_losses(setup):
    tmp, data, values = setup
    live = train(resolve_config(**tiny_config(data, tmp / "live", **values)))
    cache = build_teacher_cache(resolve_config(**tiny_config(data, tmp / "unused", **values)), tmp / "teacher.cache")
    cached = train(resolve_config(**tiny_config(data, tmp / "cached", teacher_cache=str(cache), **values)))
    assert step_losses(tmp / "cached") == step_losses(tmp / "live") and len(step_losses(tmp / "live")) == 8
    a, b = live.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a run whose views differ, or a damaged file, is refused in one line naming why
    with pytest.raises(LeViTError, match=r"made for another run \(recipe.seed"):
        train(resolve_config(**tiny_config(data, tmp / "other", teacher_cache=str(cache), seed=1, **values)))
    with pytest.raises(LeViTError, match="needs 3 of"):
        train(resolve_config(**tiny_config(data, tmp / "longer", teacher_cache=str(cache), epochs=3, **values)))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_cache_of_a_hugging_face_split_replays_the_live_teacher_and_sees_a_changed_file(setup, streaming):
    """A Parquet split read by index, or streamed (``hf_streaming=true``, files per loader worker): the
    cached run's losses and weights are the live teacher's; the same rows with one image changed (the
    classes and row counts unchanged) are another training set, and the cache is refused."""
    datasets = pytest.importorskip("datasets")
    tmp, data, values = setup
    root, out = tmp / f"parquet-{streaming}", tmp / f"runs-{streaming}"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        hf_dataset(data / split, ["c0", "c1", "c2"]).to_parquet(str(root / split / "part-0.parquet"))
    values = {**values, "hf_streaming": streaming}
    live = train(resolve_config(**tiny_config(root, out / "live", **values)))
    cache = build_teacher_cache(resolve_config(**tiny_config(root, out / "unused", **values)), out / "t.cache")
    cached = train(resolve_config(**tiny_config(root, out / "cached", teacher_cache=str(cache), **values)))
    assert step_losses(out / "cached") == step_losses(out / "live") and step_losses(out / "live")
    a, b = live.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ds = hf_dataset(data / "train", ["c0", "c1", "c2"])
    changed = ds.cast_column("image", datasets.Image(decode=False)).to_dict()  # the images' bytes as rows
    changed["image"][0] = {"bytes": _bigger_png(), "path": None}
    datasets.Dataset.from_dict(changed, features=ds.features).to_parquet(str(root / "train" / "part-0.parquet"))
    with pytest.raises(LeViTError, match=r"made for another run \(data"):
        train(resolve_config(**tiny_config(root, out / "again", teacher_cache=str(cache), **values)))


def _bigger_png() -> bytes:
    """A 40x40 PNG: a training image other than the split's, of another size."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def test_teacher_cache_command_builds_the_same_cache(setup):
    tmp, data, values = setup
    recipe = ["img_size=32", "batch_size=4", "epochs=2", "total_batch=null"]  # right after the file name
    options = ["--data", data, "--teacher-checkpoint", values["teacher_checkpoint"], "--model", "levit_tiny"]
    done = cli("data", "teacher-cache", tmp / "cli.cache", *recipe, *options)
    assert done.returncode == 0, done.stderr
    assert "teacher_cache=" in done.stderr
    library = tmp / "library.cache"
    build_teacher_cache(resolve_config(**tiny_config(data, tmp / "unused", **values)), library)
    a, b = (torch.load(p, weights_only=True) for p in (tmp / "cli.cache", library))
    assert torch.equal(a["classes"], b["classes"]) and a["fingerprint"] == b["fingerprint"]
    assert cli("data", "teacher-cache", tmp / "bad.cache", *recipe, "mixup=oops", *options).returncode == 2


def test_soft_cache_with_every_logit_gives_the_live_teachers_losses_and_top_k_comes_close(setup):
    tmp, data, values = setup
    soft = values | dict(distillation="soft", distillation_tau=2.0)
    live = train(resolve_config(**tiny_config(data, tmp / "soft_live", **soft)))
    caches = {}
    for k in (3, 1):  # 3: every class (float32, exact); 1: the top logit and the rest's mass
        cfg = resolve_config(**tiny_config(data, tmp / "unused", **soft))
        caches[k] = build_teacher_cache(cfg, tmp / f"soft{k}.cache", topk=k)
    full = train(resolve_config(**tiny_config(data, tmp / "soft_full", teacher_cache=str(caches[3]), **soft)))
    assert step_losses(tmp / "soft_full") == step_losses(tmp / "soft_live")
    a, b = live.model.state_dict(), full.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(resolve_config(**tiny_config(data, tmp / "soft_top1", teacher_cache=str(caches[1]), **soft)))
    live_losses, top1 = step_losses(tmp / "soft_live"), step_losses(tmp / "soft_top1")
    # top-1 of 3 classes: the 2 others get their total mass evenly. This random teacher's tail is nearly
    # even already, so the losses differ by float16 and tail rounding only (measured: < 1e-6; the rule's
    # worst case is bounded in test_rebuilt_distribution_keeps_the_top_k_and_the_tails_mass)
    assert live_losses != top1 and max(abs(live_losses[s] - top1[s]) for s in live_losses) < 1e-5
    # bytes per view: classes int32 + k float16 values + k int16 indices + the rest's float32
    arrays = {k: torch.load(caches[k], weights_only=True) for k in caches}
    views = arrays[1]["classes"].numel()
    per_view = {k: sum(arrays[k][n].nbytes for n in ARRAYS if n in arrays[k]) / views for k in caches}
    assert per_view == {3: 4 + 3 * 4 + 3 * 2, 1: 4 + 2 + 2 + 4}
    # a hard cache cannot answer for soft distillation; a soft cache for another temperature neither
    build_teacher_cache(resolve_config(**tiny_config(data, tmp / "unused", **values)), tmp / "hard.cache")
    with pytest.raises(LeViTError, match=r"hard.cache holds the teacher's top classes only.*distillation=soft"):
        train(resolve_config(**tiny_config(data, tmp / "refused", teacher_cache=str(tmp / "hard.cache"), **soft)))
    with pytest.raises(LeViTError, match=r"made for distillation_tau=2\.0"):
        cooler = soft | dict(distillation_tau=1.0)
        train(resolve_config(**tiny_config(data, tmp / "tau", teacher_cache=str(caches[1]), **cooler)))


def test_rebuilt_distribution_keeps_the_top_k_and_the_tails_mass(tmp_path):
    """TinyViT's rule on an ImageNet-sized teacher (1000 classes, top 10, tau 2): the top-k probabilities
    are the teacher's (float16 logits: relative error <= 2^-11 |z| / tau), the tail keeps its mass, evenly;
    the soft loss moves by at most alpha tau^2 / C * mean(m (log(C - k) + range(student tail) / tau)) plus
    the float16 part, m the tail's mass: the tail's KL to even is <= m log(C - k), and the tail's cross term
    is (p - q) . log s with sum(p - q) = 0 over the tail, so <= m range(log s); the file is as small as
    its bytes per view say (48 against 6004 + 4)."""
    torch.manual_seed(0)
    classes, k, tau, alpha = 1000, 10, 2.0, 0.5
    teacher = torch.randn(64, classes) * 3
    teacher[torch.arange(64), torch.randint(classes, (64,))] += 12  # a confident teacher, as trained ones are
    arrays = _soft_arrays((1, 1, 64), classes, k)
    _store_logits(arrays, (0, 0), teacher, tau)
    rebuilt = rebuild_logits(arrays["values"][0, 0], arrays["indices"][0, 0], arrays["rest"][0, 0], classes)
    p, q = (F.softmax(x / tau, dim=1) for x in (teacher, rebuilt))
    top = teacher.topk(k, dim=1).indices
    # float16 logits: each kept log-probability moves by <= 2 max|z| 2^-11 / tau (its logit and the normaliser)
    rounding = float(2 * teacher.abs().max() * 2**-11 / tau)
    assert torch.allclose(q.gather(1, top), p.gather(1, top), rtol=rounding, atol=0)
    mass = 1 - p.gather(1, top).sum(1)
    assert torch.allclose(1 - q.gather(1, top).sum(1), mass, rtol=rounding)
    tail = q.scatter(1, top, float("nan"))
    assert torch.allclose(tail.nanmean(1), tail.nan_to_num(1e9).amin(1)) and mass.min() > 0.01
    student = torch.randn(64, classes)

    def loss(teacher_logits):
        return distillation_loss(student, torch.zeros(64).long(), teacher_logits, mode="soft", alpha=alpha, tau=tau)

    spread = (student / tau).scatter(1, top, float("nan"))
    spread = spread.nan_to_num(-1e9).amax(1) - spread.nan_to_num(1e9).amin(1)
    bound = alpha * tau**2 / classes * (mass * (math.log(classes - k) + spread)).mean()
    difference = (loss(teacher) - loss(rebuilt)).abs()
    float16 = alpha * tau**2 / classes * 2 * rounding  # the KL of the kept classes moves by <= 2 rounding
    assert 0 < difference <= bound + float16, (difference, bound, float16)  # measured 0.0011 <= 0.013
    # file size: compact arrays against every logit (float32) of the same 6400 views
    sizes = {}
    for kept in (k, classes):
        arrays = _soft_arrays((1, 100, 64), classes, kept)
        torch.save(arrays | {"classes": torch.zeros(1, 100, 64, dtype=torch.int32)}, tmp_path / f"{kept}.pt")
        sizes[kept] = (tmp_path / f"{kept}.pt").stat().st_size
    assert abs(sizes[k] / sizes[classes] - 48 / 6008) < 1e-3, sizes
