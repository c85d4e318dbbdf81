"""Key maps between levit's state-dict names and the official release's and timm's (by name, never by position).

Name mapping (by names, never by position). Our module paths and their counterparts:

============================================  =============================  ===============================================
levit                                         official release               timm
============================================  =============================  ===============================================
stem.{0,2,4,6}.{conv,bn}                      patch_embed.{0,2,4,6}.{c,bn}   stem.conv{1,2,3,4}.{linear,bn}
stages.S.downsample.attn                      blocks.i                       stages.S.downsample.attn_downsample
  .kv.{linear,bn} / .q.{linear,bn}            .kv.{c,bn} / .q.1.{c,bn}       .kv.{linear,bn} / .q.ln.{linear,bn}
  .proj.{linear,bn} / .attention_biases       .proj.1.{c,bn} / same          .proj.ln.{linear,bn} / same
stages.S.downsample.mlp.fc{1,2}               blocks.i+1.m.{0,2}             stages.S.downsample.mlp.ln{1,2}
stages.S.blocks.J.attn                        blocks.k.m                     stages.S.blocks.J.attn
  .qkv.{linear,bn} / .proj.{linear,bn}        .qkv.{c,bn} / .proj.1.{c,bn}   .qkv.{linear,bn} / .proj.ln.{linear,bn}
stages.S.blocks.J.mlp.fc{1,2}                 blocks.k+1.m.{0,2}             stages.S.blocks.J.mlp.ln{1,2}
head{,_dist}.{bn,linear}                      head{,_dist}.{bn,l}            head{,_dist}.{bn,linear}
============================================  =============================  ===============================================

The official file's flat ``blocks`` list runs over all stages: per stage a shrink attention and its
MLP (stages after the first), then (attention, MLP) x depth. Official files also carry the int64
``attention_bias_idxs`` buffers; :func:`to_ours` drops them (the model derives its own from the config).

A new layout (e.g. Hugging Face's) plugs in by adding its key-map function to :data:`KEY_MAPS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..models.config import LeViTConfig

__all__ = [
    "KEY_MAPS",
    "expected_shapes",
    "official_key_map",
    "our_shapes",
    "timm_key_map",
    "to_official_state_dict",
    "to_ours",
    "to_timm_state_dict",
]


# ---- name mapping ------------------------------------------------------------------------------
def _module_pairs(cfg: LeViTConfig, fmt: str) -> list[tuple[str, str, str]]:
    """(our module prefix, their module prefix, kind) for every weight-holding module."""
    pairs: list[tuple[str, str, str]] = []
    for n, i in enumerate(range(0, 7, 2)):
        pairs.append((f"stem.{i}", f"patch_embed.{i}" if fmt == "official" else f"stem.conv{n + 1}", "convbn"))
    k = 0  # official flat block index
    for s in range(cfg.num_stages):
        stage_blocks = [(f"stages.{s}.downsample", "shrink")] if s > 0 else []
        stage_blocks += [(f"stages.{s}.blocks.{j}", "block") for j in range(cfg.depth[s])]
        for prefix, kind in stage_blocks:
            if fmt == "official":
                attn, mlp = (f"blocks.{k}", "shrink") if kind == "shrink" else (f"blocks.{k}.m", "attn")
                pairs.append((f"{prefix}.attn", attn, mlp))
                pairs.append((f"{prefix}.mlp.fc1", f"blocks.{k + 1}.m.0", "linearbn"))
                pairs.append((f"{prefix}.mlp.fc2", f"blocks.{k + 1}.m.2", "linearbn"))
                k += 2
            else:
                attn = f"{prefix}.attn_downsample" if kind == "shrink" else f"{prefix}.attn"
                pairs.append((f"{prefix}.attn", attn, "shrink" if kind == "shrink" else "attn"))
                pairs.append((f"{prefix}.mlp.fc1", f"{prefix}.mlp.ln1", "linearbn"))
                pairs.append((f"{prefix}.mlp.fc2", f"{prefix}.mlp.ln2", "linearbn"))
    pairs += [("head", "head", "head"), ("head_dist", "head_dist", "head")]
    return pairs


# sub-names inside each kind of module: ours -> (official, timm)
_SUBNAMES: dict[str, dict[str, tuple[str, str]]] = {
    "convbn": {"conv.": ("c.", "linear."), "bn.": ("bn.", "bn.")},
    "linearbn": {"linear.": ("c.", "linear."), "bn.": ("bn.", "bn.")},
    "head": {"linear.": ("l.", "linear."), "bn.": ("bn.", "bn.")},
    "attn": {
        "qkv.linear.": ("qkv.c.", "qkv.linear."),
        "qkv.bn.": ("qkv.bn.", "qkv.bn."),
        "proj.linear.": ("proj.1.c.", "proj.ln.linear."),
        "proj.bn.": ("proj.1.bn.", "proj.ln.bn."),
        "attention_biases": ("attention_biases", "attention_biases"),
    },
    "shrink": {
        "kv.linear.": ("kv.c.", "kv.linear."),
        "kv.bn.": ("kv.bn.", "kv.bn."),
        "q.linear.": ("q.1.c.", "q.ln.linear."),
        "q.bn.": ("q.1.bn.", "q.ln.bn."),
        "proj.linear.": ("proj.1.c.", "proj.ln.linear."),
        "proj.bn.": ("proj.1.bn.", "proj.ln.bn."),
        "attention_biases": ("attention_biases", "attention_biases"),
    },
}


def our_shapes(cfg: LeViTConfig) -> dict[str, tuple[int, ...]]:
    """Our (unfused) state-dict names -> shapes for ``cfg``, from a weightless model on the ``meta`` device."""
    from ..models.network import LeViT

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LeViT(cfg).state_dict().items()}


def _our_keys(cfg: LeViTConfig) -> list[str]:
    return list(our_shapes(cfg))


def _key_map(cfg: LeViTConfig, fmt: str) -> dict[str, str]:
    col = 0 if fmt == "official" else 1
    pairs = sorted(_module_pairs(cfg, fmt), key=lambda p: -len(p[0]))
    out = {}
    for key in _our_keys(cfg):
        for ours, theirs, kind in pairs:
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1 :]
                for a, b in _SUBNAMES[kind].items():
                    if rest.startswith(a):
                        out[key] = f"{theirs}.{b[col]}{rest[len(a) :]}"
                        break
                break
        if key not in out:
            raise AssertionError(f"no {fmt} name for {key}")  # a bug in the table above
    return out


def official_key_map(cfg: LeViTConfig) -> dict[str, str]:
    """Our state-dict key -> official release key, for the network described by ``cfg``."""
    return _key_map(cfg, "official")


def timm_key_map(cfg: LeViTConfig) -> dict[str, str]:
    """Our state-dict key -> timm ``LevitDistilled`` key, for the network described by ``cfg``."""
    return _key_map(cfg, "timm")


def _bias_owners(cfg: LeViTConfig) -> dict[str, Tensor]:
    """Module prefix (ours) of every attention -> its index buffer, as the official files store it."""
    from ..models.layers import attention_bias_index

    out = {}
    for s, r in enumerate(cfg.grid_sizes):
        if s > 0:
            out[f"stages.{s}.downsample.attn"] = attention_bias_index(cfg.grid_sizes[s - 1], 2)
        for j in range(cfg.depth[s]):
            out[f"stages.{s}.blocks.{j}.attn"] = attention_bias_index(r)
    return out


def to_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the official release's names, with the ``attention_bias_idxs`` buffers."""
    cfg = model.config
    kmap = official_key_map(cfg)
    sd = {kmap[k]: v for k, v in model.state_dict().items()}
    for prefix, idx in _bias_owners(cfg).items():
        sd[kmap[prefix + ".attention_biases"].replace("attention_biases", "attention_bias_idxs")] = idx
    return sd


def to_timm_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under timm's ``LevitDistilled`` names (loadable with ``strict=True``)."""
    kmap = timm_key_map(model.config)
    return {kmap[k]: v for k, v in model.state_dict().items()}


KEY_MAPS: dict[str, Callable[[LeViTConfig], dict[str, str]]] = {
    "official": official_key_map,
    "timm": timm_key_map,
}
"""Checkpoint layout -> function giving our key -> their key for a config (levit's own needs none)."""


def to_ours(sd: Mapping[str, Tensor], cfg: LeViTConfig, fmt: str) -> dict[str, Tensor]:
    """A ``fmt`` state dict (a key of :data:`KEY_MAPS`) under our names. Index buffers are dropped (the
    model recomputes them); unknown names are kept as they are so that the strict check reports them."""
    kmap = KEY_MAPS[fmt](cfg)
    inverse = {v: k for k, v in kmap.items()}
    # head_dist / head names that the model may not have (distillation off) still translate
    for ours, theirs in list(kmap.items()):
        if ours.startswith("head."):
            inverse.setdefault(theirs.replace("head.", "head_dist.", 1), "head_dist." + ours[5:])
    return {inverse.get(k, k): v for k, v in sd.items() if not k.endswith("attention_bias_idxs")}


def expected_shapes(cfg: LeViTConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a ``fmt`` checkpoint of ``cfg`` holds (index buffers left out)."""
    own = our_shapes(cfg)
    if fmt not in KEY_MAPS:
        return own
    kmap = KEY_MAPS[fmt](cfg)
    return {kmap[k]: v for k, v in own.items()}
