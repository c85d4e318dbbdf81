"""Hugging Face transformers LeViT checkpoints in and out (``LevitForImageClassificationWithTeacher``).

The released weights on the Hugging Face Hub (``facebook/levit-128S``, ``facebook/levit-128``,
``facebook/levit-192``, ``facebook/levit-256``, ``facebook/levit-384``) are stored under transformers'
names. They are read from a ``pytorch_model.bin``, a ``model.safetensors`` or a whole
``save_pretrained`` folder; the variant is recognised from ``config.json`` (``hidden_sizes``,
``num_attention_heads``, ``depths``, ``key_dim``) or, without one, from the tensor shapes.

Name map (by names, never by position). ``S`` is our stage, ``J`` a block in it, ``d(S)`` the depth
of stage S; transformers keeps each shrink attention and its MLP at the END of the previous stage:

==============================================  ==================================================================
levit                                           transformers (prefix ``levit.`` except the classifiers)
==============================================  ==================================================================
stem.{0,2,4,6}.{conv,bn}                        patch_embeddings.embedding_layer_{1,2,3,4}.{convolution,batch_norm}
stages.S.blocks.J.attn.qkv.{linear,bn}          encoder.stages.S.layers.{2J}.module.queries_keys_values.{linear,batch_norm}
stages.S.blocks.J.attn.proj.{linear,bn}         encoder.stages.S.layers.{2J}.module.projection.{linear,batch_norm}
stages.S.blocks.J.attn.attention_biases         encoder.stages.S.layers.{2J}.module.attention_biases
stages.S.blocks.J.mlp.fc{1,2}.{linear,bn}       encoder.stages.S.layers.{2J+1}.module.linear_{up,down}.{linear,batch_norm}
stages.S.downsample.attn.kv.{linear,bn}         encoder.stages.{S-1}.layers.{2d(S-1)}.keys_values.{linear,batch_norm}
stages.S.downsample.attn.q.{linear,bn}          encoder.stages.{S-1}.layers.{2d(S-1)}.queries.{linear,batch_norm}
stages.S.downsample.attn.proj.{linear,bn}       encoder.stages.{S-1}.layers.{2d(S-1)}.projection.{linear,batch_norm}
stages.S.downsample.attn.attention_biases       encoder.stages.{S-1}.layers.{2d(S-1)}.attention_biases
stages.S.downsample.mlp.fc{1,2}.{linear,bn}     encoder.stages.{S-1}.layers.{2d(S-1)+1}.module.linear_{up,down}.{...}
head.{bn,linear} / head_dist.{bn,linear}        classifier.{batch_norm,linear} / classifier_distill.{batch_norm,linear}
==============================================  ==================================================================

BatchNorm buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) follow their module.
Both sides index the bias tables by the (dy, dx) offset in the same order, so tables copy as they are.
A base ``LevitModel`` file (no ``levit.`` prefix, no classifiers) is read too (num_classes 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..models.config import PATCH_SIZE, VARIANTS, LeViTConfig
from ..utils import atomic_path

__all__ = [
    "hf_config_dict",
    "hf_key_map",
    "hf_to_levit_state_dict",
    "is_hf_state_dict",
    "levit_to_hf_state_dict",
    "save_hf_pretrained",
]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_STEM = "patch_embeddings.embedding_layer_1.convolution.weight"
_SUB = {"linear": "linear", "bn": "batch_norm", "conv": "convolution"}


def is_hf_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """Whether ``sd`` is in transformers' LeViT layout (with or without the ``levit.`` prefix)."""
    return any(k in (_STEM, "levit." + _STEM) for k in sd)


def _pairs(cfg: LeViTConfig) -> list[tuple[str, str]]:
    """(our module prefix, transformers' module prefix without ``levit.``) for every weight holder."""
    out = [(f"stem.{2 * i}", f"patch_embeddings.embedding_layer_{i + 1}") for i in range(4)]
    for s in range(cfg.num_stages):
        for j in range(cfg.depth[s]):
            hf = f"encoder.stages.{s}.layers"
            out += [
                (f"stages.{s}.blocks.{j}.attn.qkv", f"{hf}.{2 * j}.module.queries_keys_values"),
                (f"stages.{s}.blocks.{j}.attn.proj", f"{hf}.{2 * j}.module.projection"),
                (f"stages.{s}.blocks.{j}.attn", f"{hf}.{2 * j}.module"),
                (f"stages.{s}.blocks.{j}.mlp.fc1", f"{hf}.{2 * j + 1}.module.linear_up"),
                (f"stages.{s}.blocks.{j}.mlp.fc2", f"{hf}.{2 * j + 1}.module.linear_down"),
            ]
        if s > 0:
            k = 2 * cfg.depth[s - 1]
            hf = f"encoder.stages.{s - 1}.layers"
            out += [
                (f"stages.{s}.downsample.attn.kv", f"{hf}.{k}.keys_values"),
                (f"stages.{s}.downsample.attn.q", f"{hf}.{k}.queries"),
                (f"stages.{s}.downsample.attn.proj", f"{hf}.{k}.projection"),
                (f"stages.{s}.downsample.attn", f"{hf}.{k}"),
                (f"stages.{s}.downsample.mlp.fc1", f"{hf}.{k + 1}.module.linear_up"),
                (f"stages.{s}.downsample.mlp.fc2", f"{hf}.{k + 1}.module.linear_down"),
            ]
    return out


def hf_key_map(cfg: LeViTConfig) -> dict[str, str]:
    """Our state-dict key -> transformers' ``LevitForImageClassificationWithTeacher`` key for ``cfg``."""
    from ..models.network import LeViT

    with torch.device("meta"):
        keys = list(LeViT(cfg).state_dict())
    pairs = dict(_pairs(cfg))
    out = {}
    for key in keys:
        if key.startswith(("head.", "head_dist.")):
            head, sub, leaf = key.split(".", 2)
            out[key] = f"{'classifier' if head == 'head' else 'classifier_distill'}.{_SUB[sub]}.{leaf}"
            continue
        module, leaf = key.rsplit(".", 1)
        if module.endswith((".linear", ".bn", ".conv")):
            owner, sub = module.rsplit(".", 1)
            out[key] = f"levit.{pairs[owner]}.{_SUB[sub]}.{leaf}"
        else:  # attention_biases
            out[key] = f"levit.{pairs[module]}.{leaf}"
    return out


def hf_to_levit_state_dict(sd: Mapping[str, Tensor], cfg: LeViTConfig) -> dict[str, Tensor]:
    """transformers' names -> ours. Names outside the map are kept as they are (the strict load names them)."""
    kmap = hf_key_map(cfg.replace(distillation=True, num_classes=max(cfg.num_classes, 1)))
    inverse = {v: k for k, v in kmap.items()}
    out = {}
    for k, v in sd.items():
        k = k if k.startswith(("levit.", "classifier")) else "levit." + k  # base LevitModel files
        out[inverse.get(k, k)] = v
    return out


def levit_to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """An (unfused) levit model's weights under transformers' names, loadable with ``strict=True`` into
    ``LevitForImageClassificationWithTeacher`` (``LevitForImageClassification`` without distillation)."""
    if getattr(model, "is_fused", False):
        raise ValueError("a fused model has no BatchNorms to export: convert the unfused model")
    kmap = hf_key_map(model.config)
    return {kmap[k]: v for k, v in model.state_dict().items()}


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def hf_config_dict(cfg: LeViTConfig) -> dict:
    """transformers ``LevitConfig`` fields (``config.json``) describing ``cfg``."""
    if not isinstance(cfg.img_size, int):
        raise ValueError(f"transformers' LevitConfig takes a square image_size, not {cfg.img_size}")
    kd, heads = cfg.key_dim, cfg.shrink_heads
    d = {
        "model_type": "levit",
        "architectures": [
            "LevitForImageClassificationWithTeacher" if cfg.distillation else "LevitForImageClassification"
        ],
        "image_size": cfg.img_size,
        "num_channels": cfg.in_chans,
        "kernel_size": 3,
        "stride": 2,
        "padding": 1,
        "patch_size": PATCH_SIZE,
        "hidden_sizes": list(cfg.embed_dim),
        "num_attention_heads": list(cfg.num_heads),
        "depths": list(cfg.depth),
        "key_dim": [kd] * cfg.num_stages,
        "drop_path_rate": 0,  # typed int by transformers; a training setting, not part of the weights
        "mlp_ratio": [_num(cfg.mlp_ratio)] * cfg.num_stages,
        "attention_ratio": [_num(cfg.attn_ratio)] * cfg.num_stages,
        "down_ops": [
            ["Subsample", kd, heads[s], _num(cfg.down_attn_ratio), _num(cfg.down_mlp_ratio), 2]
            for s in range(cfg.num_stages - 1)
        ],
        "initializer_range": 0.02,
        "id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(cfg.num_classes)},
    }
    return d


def save_hf_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write a ``save_pretrained``-style folder (``config.json`` + ``model.safetensors``) that
    ``transformers.LevitForImageClassificationWithTeacher.from_pretrained(folder)`` loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config)
    names = getattr(model, "class_names", None)
    if names and len(names) == model.config.num_classes:
        config["id2label"] = {str(i): n for i, n in enumerate(names)}
        config["label2id"] = {n: i for i, n in enumerate(names)}
    sd = {k: v.detach().cpu().contiguous() for k, v in levit_to_hf_state_dict(model).items()}
    for name, write in (
        ("model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"})),
        ("config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n")),
    ):
        with atomic_path(folder / name) as tmp:  # the user's umask permissions, as levit.save gives
            write(tmp)
    return folder


# ---- reading (hooks called by levit.weights.format) -----------------------------------------------
def resolve_folder(path: Path) -> Path:
    """A ``save_pretrained`` folder -> its weights file; any other path is returned unchanged."""
    if not path.is_dir():
        return path
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(f"{path}: sharded Hugging Face checkpoints are not supported (LeViT fits one file)")
    raise CheckpointError(f"{path}: a folder, but it holds no {' or '.join(_WEIGHT_FILES)} (save_pretrained layout)")


def _config_json(path: Path) -> dict | None:
    cfg_path = path.parent / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable config.json ({type(e).__name__}: {e})") from e
    return d if isinstance(d, dict) and d.get("model_type") == "levit" else None


def _dims_from_tensors(sd: Mapping[str, Tensor]) -> dict:
    """hidden_sizes / num_attention_heads / depths / key_dim read off the tensor shapes."""
    sd = {k.removeprefix("levit."): v for k, v in sd.items()}
    stages = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.stages.")})
    hidden, heads, depths = [], [], []
    for s in stages:
        layers = {int(k.split(".")[4]) for k in sd if k.startswith(f"encoder.stages.{s}.layers.")}
        n = len(layers) - (2 if s < stages[-1] else 0)  # the last two are the shrink attention + MLP
        qkv = sd[f"encoder.stages.{s}.layers.0.module.queries_keys_values.linear.weight"]
        heads.append(sd[f"encoder.stages.{s}.layers.0.module.attention_biases"].shape[0])
        hidden.append(qkv.shape[1])
        depths.append(n // 2)
    qkv_rows = sd[f"encoder.stages.{stages[0]}.layers.0.module.queries_keys_values.linear.weight"].shape[0]
    kd = qkv_rows // heads[0] // 4  # per head [q: D, k: D, v: 2D] (attention_ratio 2 in every variant)
    return {"hidden_sizes": hidden, "num_attention_heads": heads, "depths": depths, "key_dim": [kd] * len(stages)}


def _variant(dims: dict) -> str | None:
    for name, c in VARIANTS.items():
        kd = dims.get("key_dim")
        kd = kd[0] if isinstance(kd, list | tuple) and kd else kd
        if (
            list(dims.get("hidden_sizes") or []) == list(c.embed_dim)
            and list(dims.get("num_attention_heads") or []) == list(c.num_heads)
            and list(dims.get("depths") or []) == list(c.depth)
            and kd == c.key_dim
        ):
            return name
    return None


def hf_metadata(sd: Mapping[str, Tensor], path: Path) -> dict | None:
    """levit-style metadata (variant, config) for a transformers LeViT file, None for other layouts.

    The variant comes from the ``config.json`` next to the weights when there is one, else from the
    tensor shapes; ``image_size`` from ``config.json`` (default 224); classes and distillation from
    the classifier tensors.
    """
    if not is_hf_state_dict(sd):
        return None
    conf = _config_json(path)
    dims = conf if conf is not None else _dims_from_tensors(sd)
    name = _variant(dims)
    if name is None:
        got = {k: dims.get(k) for k in ("hidden_sizes", "num_attention_heads", "depths", "key_dim")}
        raise CheckpointError(
            f"{path}: Hugging Face LeViT {got} is not one of the levit variants ({', '.join(VARIANTS)})"
        )
    w = sd.get("classifier.linear.weight")
    changes: dict = {"num_classes": int(w.shape[0]) if w is not None else 0}
    changes["distillation"] = "classifier_distill.linear.weight" in sd or w is None
    if conf is not None and isinstance(conf.get("image_size"), int):
        changes["img_size"] = conf["image_size"]
    cfg = VARIANTS[name].replace(**changes)
    meta = {"format_version": 1, "variant": name, "config": cfg.to_dict(), "source": "huggingface"}
    labels = (conf or {}).get("id2label")
    if isinstance(labels, dict) and len(labels) == cfg.num_classes:
        names = [labels.get(str(i)) for i in range(cfg.num_classes)]
        if all(isinstance(n, str) for n in names) and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            meta["class_names"] = names
    return meta
