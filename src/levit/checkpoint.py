"""Checkpoints: detect, convert and load official / timm / levit files; save; download.

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
``attention_bias_idxs`` buffers; they are dropped on loading (the model derives its own from the config).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PAPER_RESULTS, VARIANTS, LeViTConfig
from .errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "download_checkpoint",
    "download_pretrained",
    "load_checkpoint",
    "official_key_map",
    "read_checkpoint",
    "read_metadata",
    "save",
    "timm_key_map",
    "to_official_state_dict",
    "to_timm_state_dict",
]

FORMAT_VERSION = 1
_META_KEY = "levit"


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


def _our_keys(cfg: LeViTConfig) -> list[str]:
    from .model import LeViT

    with torch.device("meta"):
        return list(LeViT(cfg).state_dict().keys())


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
    from .layers import attention_bias_index

    out = {}
    for s, r in enumerate(cfg.resolutions):
        if s > 0:
            out[f"stages.{s}.downsample.attn"] = attention_bias_index(cfg.resolutions[s - 1], 2)
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


# ---- reading -----------------------------------------------------------------------------------
def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


_UNREADABLE = "cannot read it as a checkpoint: truncated, corrupt, or not a torch .pth / .safetensors file"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Read a checkpoint file: (state dict, levit metadata or None). Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path}: file is empty or truncated, not a checkpoint")
    # safetensors: 8-byte little-endian header length, then a JSON header; anything else goes to torch.load
    header_len = int.from_bytes(head[:8], "little")
    if not (head[8:9] == b"{" and header_len < path.stat().st_size):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: {_UNREADABLE} ({_short(e)})") from e
        return _unwrap(obj, path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise CheckpointError(f"{path}: {_UNREADABLE} ({_short(e)})") from e
    info = None
    if _META_KEY in meta:
        try:
            info = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt levit metadata ({_short(e)})") from e
    return sd, info


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], dict | None]:
    info = None
    if isinstance(obj, Mapping):
        if isinstance(obj.get(_META_KEY), Mapping):
            info = dict(obj[_META_KEY])
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()) or not obj:
        raise CheckpointError(f"{path}: not a LeViT checkpoint (no state dict of tensors found)")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    return sd, info


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The levit metadata (format version, variant, config, fused) of a file, or None for other formats."""
    return read_checkpoint(path)[1]


def _detect(sd: Mapping[str, Tensor], path: Path) -> str:
    if any(k.startswith("patch_embed.0.c.") for k in sd):
        return "official"
    if "stem.conv1.linear.weight" in sd:
        return "timm"
    if "stem.0.conv.weight" in sd:
        return "levit"
    if "stem.0.weight" in sd and any(k.endswith("attn_bias") for k in sd):
        return "levit-fused"
    raise CheckpointError(
        f"{path}: not a LeViT checkpoint (none of the official 'patch_embed.0.c.weight', timm "
        f"'stem.conv1.linear.weight' or levit 'stem.0.conv.weight' keys; first key is {next(iter(sd), None)!r})"
    )


def _resize_bias_table(t: Tensor, r_new: int) -> Tensor:
    """Resample a (H, r*r) relative-offset bias table to (H, r_new*r_new) (bicubic over offsets)."""
    h, n = t.shape
    r = round(n**0.5)
    grid = t.detach().float().reshape(1, h, r, r)
    # offsets 0..r-1 map to 0..r_new-1 with the same spacing as the token grid they index
    out = F.interpolate(grid, size=(r_new, r_new), mode="bicubic", align_corners=True)
    return out.reshape(h, r_new * r_new).to(t.dtype)


def _fit_to_model(sd: dict[str, Tensor], model: nn.Module, path: Path, fmt: str) -> dict[str, Tensor]:
    """Adapt heads (num_classes / distillation) and bias tables (img_size), then check strictly."""
    cfg: LeViTConfig = model.config
    own = model.state_dict()
    heads = [h for h in ("head", "head_dist") if any(k.startswith(h + ".") for k in own)]
    ck_heads = [h for h in ("head", "head_dist") if any(k.startswith(h + ".") for k in sd)]
    w_key = "head.weight" if fmt == "levit-fused" else "head.linear.weight"
    if w_key in sd and w_key in own and sd[w_key].shape[0] != own[w_key].shape[0]:
        if fmt == "levit-fused":
            raise CheckpointError(
                f"{path}: fused checkpoint has {sd[w_key].shape[0]} classes, the model {own[w_key].shape[0]}; "
                "change num_classes on the unfused model, then fuse"
            )
        warnings.warn(
            f"{path.name}: checkpoint has {sd[w_key].shape[0]} classes, model has {cfg.num_classes}: "
            "the classifier head(s) are re-initialised",
            stacklevel=3,
        )
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
        sd.update({k: v for k, v in own.items() if k.startswith(("head.", "head_dist."))})
    elif "head_dist" in ck_heads and "head_dist" not in heads:
        warnings.warn(f"{path.name}: model built without distillation: head_dist dropped", stacklevel=3)
        sd = {k: v for k, v in sd.items() if not k.startswith("head_dist.")}
    elif "head_dist" in heads and "head_dist" not in ck_heads and "head" in ck_heads:
        warnings.warn(f"{path.name}: checkpoint has no head_dist: it starts as a copy of head", stacklevel=3)
        sd.update({"head_dist." + k[5:]: v.clone() for k, v in sd.items() if k.startswith("head.")})

    for key, want in own.items():
        if key not in sd:
            raise CheckpointError(
                f"{path}: tensor {key!r} of {cfg.name} is missing from the checkpoint (wrong variant?)"
            )
        got = sd[key]
        resizable = key.endswith("attention_biases") and got.ndim == 2 and got.shape[0] == want.shape[0]
        if resizable and got.shape != want.shape:
            sd[key] = _resize_bias_table(got, round(want.shape[1] ** 0.5))
            continue
        if key.endswith("attn_bias") and got.shape != want.shape:
            raise CheckpointError(
                f"{path}: fused checkpoint was made for another img_size ({key} {tuple(got.shape)} vs "
                f"{tuple(want.shape)}); load the unfused checkpoint at the new size instead"
            )
        if got.shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(got.shape)} in the checkpoint but {tuple(want.shape)} "
                f"in {cfg.name} (wrong variant?)"
            )
    extra = [k for k in sd if k not in own]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} for {cfg.name} (wrong variant?)")
    return sd


def load_checkpoint(path: str | os.PathLike, name: str, **explicit: object) -> nn.Module:
    """Build the model ``name`` (with ``explicit`` config changes) and load ``path`` into it, strictly.

    For levit's own files the saved config is the base and ``explicit`` changes apply on top; for
    official and timm files the variant's config is. A fused file gives a :class:`FusedLeViT`.
    """
    from .fuse import FusedLeViT
    from .model import LeViT
    from .registry import canonical_name

    path = Path(path)
    sd, info = read_checkpoint(path)
    fmt = _detect(sd, path)
    name = canonical_name(name)
    cfg = VARIANTS[name]
    if info is not None:
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: levit format version {version!r} is not supported (this is {FORMAT_VERSION})"
            )
        if info.get("variant") != name:
            raise CheckpointError(f"{path}: checkpoint holds {info.get('variant')}, but model {name} was asked for")
        try:
            cfg = LeViTConfig.from_dict(info["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt levit metadata ({_short(e)})") from e
    ablation = explicit.pop("ablation", cfg.ablation)
    if ablation != cfg.ablation:  # the paper's Table 5 rows: only on top of a plain LeViT
        if cfg.ablation is not None:
            raise CheckpointError(f"{path}: checkpoint holds ablation {cfg.ablation}, but {ablation} was asked for")
        from .config import ablation_config

        cfg = ablation_config(cfg, ablation)
    try:
        cfg = cfg.replace(**explicit)
    except TypeError as e:
        raise ValueError(str(e)) from None
    original = sd
    if fmt == "official":
        sd = _rename(sd, official_key_map(cfg), path)
    elif fmt == "timm":
        sd = _rename(sd, timm_key_map(cfg), path)
    model: nn.Module = FusedLeViT(cfg) if fmt == "levit-fused" else LeViT(cfg)
    try:
        sd = _fit_to_model(sd, model, path, fmt)
    except CheckpointError as e:
        if fmt in ("official", "timm", "levit") and "wrong variant" in str(e):
            raise CheckpointError(_diagnose(original, cfg, fmt, path)) from None
        raise
    model.load_state_dict(sd, strict=True)
    names = (info or {}).get("class_names")
    if isinstance(names, list) and len(names) == cfg.num_classes:
        model.class_names = [str(n) for n in names]
    return model


def _expected(cfg: LeViTConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a ``fmt`` checkpoint of ``cfg`` holds (index buffers left out)."""
    from .model import LeViT

    with torch.device("meta"):
        own = LeViT(cfg).state_dict()
    kmap = {"official": official_key_map, "timm": timm_key_map}.get(fmt, lambda c: {k: k for k in own})(cfg)
    return {kmap[k]: tuple(v.shape) for k, v in own.items()}


def _diagnose(sd: Mapping[str, Tensor], cfg: LeViTConfig, fmt: str, path: Path) -> str:
    """One line naming the first tensor (in file order) whose name or shape differs, and the variant
    that the file does match, if any."""
    got = [(k, tuple(v.shape)) for k, v in sd.items() if not k.endswith("attention_bias_idxs")]
    exp = list(_expected(cfg, fmt).items())
    if [k for k, _ in got] == sorted(k for k, _ in got):  # safetensors files keep names sorted
        exp.sort()
    msg = f"{path}: checkpoint does not fit {cfg.name}"
    for i, (ek, es) in enumerate(exp):
        have = dict(got)
        if ek in have and have[ek] != es:
            msg += f": first mismatch is {ek!r} {have[ek]} in the checkpoint vs {es} in the model"
            break
        if ek not in have:  # pair it with the tensor at the same place in the file
            gk, gs = got[i] if i < len(got) else ("nothing", ())
            msg += f": first mismatch is {gk!r} {gs} in the checkpoint vs {ek!r} {es} in the model"
            break
    else:
        msg += f": it has {len(got)} tensors, the model {len(exp)}"
    for name, base in VARIANTS.items():
        if name == cfg.name:
            continue
        other = base.replace(num_classes=cfg.num_classes, distillation=cfg.distillation, img_size=cfg.img_size)
        if dict(got) == _expected(other, fmt):
            return msg + f"; the file holds {name}"
    return msg + " (wrong variant?)"


def _rename(sd: dict[str, Tensor], kmap: dict[str, str], path: Path) -> dict[str, Tensor]:
    """Their names -> ours. Index buffers are dropped (they are recomputed); unknown names are kept
    as they are so that the strict check reports them."""
    inverse = {v: k for k, v in kmap.items()}
    # head_dist / head names that the model may not have (distillation off) still translate
    for ours, theirs in list(kmap.items()):
        if ours.startswith("head."):
            inverse.setdefault(theirs.replace("head.", "head_dist.", 1), "head_dist." + ours[5:])
    return {inverse.get(k, k): v for k, v in sd.items() if not k.endswith("attention_bias_idxs")}


# ---- saving ------------------------------------------------------------------------------------
def build_metadata(model: nn.Module, **extra: object) -> dict:
    """The self-description every levit file carries (format version, variant, config, fused or not,
    levit version, class names when the model has them), plus ``extra`` entries (e.g. ``eval``)."""
    from ._version import __version__

    cfg = model.config
    meta: dict = {
        "format_version": FORMAT_VERSION,
        "variant": cfg.name,
        "config": cfg.to_dict(),
        "fused": bool(getattr(model, "is_fused", False)),
        "levit_version": __version__,
    }
    if getattr(model, "class_names", None):
        meta["class_names"] = list(model.class_names)
    return meta | extra


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` in levit's own format: safetensors weights + JSON metadata in the header.

    The metadata holds the format version, the variant, the full config and whether the model is
    fused. The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    from safetensors.torch import save_file

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, LeViTConfig):
        raise TypeError(f"save() needs a levit model, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = build_metadata(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- download ----------------------------------------------------------------------------------
_HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.\w+$")


def _cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_checkpoint(url: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` into the torch hub cache (reused when present) and check the SHA-256 prefix
    that the file name carries (``NAME-<hex>.pth``). Raises :class:`CheckpointError` when offline."""
    fname = url.rsplit("/", 1)[-1]
    dst = Path(cache_dir) if cache_dir is not None else _cache_dir()
    target = dst / fname
    if target.is_file():
        return target
    m = _HASH_RE.search(fname)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            sha = hashlib.sha256()
            bar = _progress(total, fname) if progress else None
            while chunk := r.read(1 << 20):
                f.write(chunk)
                sha.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"cannot download {url} ({reason}); fetch it elsewhere and put it at {target}, "
            "or pass checkpoint=PATH (--checkpoint PATH)"
        ) from e
    if m and not sha.hexdigest().startswith(m.group(1)):
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"downloaded {fname} has SHA-256 {sha.hexdigest()[:12]}..., expected {m.group(1)}...: file corrupted in transit"
        )
    os.replace(tmp, target)
    return target


def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def download_pretrained(name: str) -> Path:
    """Path to the official released weights of ``name``, downloaded once into the torch hub cache.

    ``LEVIT_PRETRAINED_URL`` may point to a mirror folder holding the same file names.
    """
    from .registry import canonical_name

    name = canonical_name(name)
    if name not in PAPER_RESULTS:
        raise CheckpointError(f"no released weights for {name}; released: {', '.join(PAPER_RESULTS)}")
    url = PAPER_RESULTS[name].url
    mirror = os.environ.get("LEVIT_PRETRAINED_URL")
    if mirror:
        url = mirror.rstrip("/") + "/" + url.rsplit("/", 1)[-1]
    return download_checkpoint(url)
