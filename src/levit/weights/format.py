"""The levit file format and checkpoint reading: the one owner of reading, detecting, fitting and
saving checkpoint files and of the metadata levit files carry.

Layouts read: the official release (``{"model": state_dict}`` .pth), timm LeViT state dicts (.pth or
.safetensors), and levit's own files (safetensors weights + JSON metadata: format version, variant,
config, fused or not, class names), unfused or fused. The key maps between layouts live in
:mod:`levit.weights.convert`, downloads in :mod:`levit.weights.hub`; models are built by
:func:`levit.factory.create.create_model`, which calls :func:`open_checkpoint`,
:func:`checkpoint_config` and :func:`load_into` here.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._version import __version__
from ..errors import CheckpointError
from ..models.config import VARIANTS, LeViTConfig
from ..utils import atomic_path, first_line
from .convert import (  # noqa: F401 (kept importable from here)
    KEY_MAPS,
    expected_shapes,
    official_key_map,
    timm_key_map,
    to_official_state_dict,
    to_ours,
    to_timm_state_dict,
)

__all__ = [
    "DETECTORS",
    "FORMAT_VERSION",
    "Checkpoint",
    "build_metadata",
    "checkpoint_config",
    "detect_format",
    "load_into",
    "open_checkpoint",
    "read_checkpoint",
    "read_metadata",
    "save",
    "unwrap_state_dict",
]

FORMAT_VERSION = 1
_META_KEY = "levit"
# integer buffers that state dicts legitimately hold (index tables, BatchNorm step counters)
_INTEGER_BUFFERS = ("attention_bias_idxs", "num_batches_tracked")


# ---- reading -----------------------------------------------------------------------------------
def _short(e: BaseException) -> str:
    msg = first_line(e, limit=200)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


_UNREADABLE = "cannot read it as a checkpoint: truncated, corrupt, or not a torch .pth / .safetensors file"
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "state_dict_ema")


def read_checkpoint(path: str | os.PathLike, *, flag: str | None = None) -> tuple[dict[str, Tensor], dict | None]:
    """Read a checkpoint file: (state dict, levit metadata or None). Raises :class:`CheckpointError`,
    whose message starts with ``flag`` (e.g. ``"--teacher-checkpoint"``) when given.

    A Hugging Face ``save_pretrained`` folder is read through its weights file, and transformers'
    files get metadata naming their variant (:mod:`levit.weights.hf`)."""
    from . import hf

    path = hf.resolve_folder(Path(path))
    sd, info = _read_file(path, f"{flag}: " if flag else "")
    return sd, info if info is not None else hf.hf_metadata(sd, path)


def _is_text(start: bytes) -> bool:
    """Whether a file's first bytes are text (UTF-8 without NUL): torch (zip or pickle) and
    safetensors files start with binary headers, so text is never a checkpoint."""
    if b"\0" in start:
        return False
    try:
        start.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(start) - 3  # a character cut at the end of the sample is still text
    return True


# what an exported artifact handed over as a checkpoint is for: it holds a program, not weights that
# load into a model, so the message names where it runs instead of a decoder's error
_EXPORTED = {
    "onnx": "this is an exported ONNX file, not a checkpoint: use it with ONNX Runtime "
    "(onnxruntime.InferenceSession), or give the .safetensors / .pth it was exported from",
    "pte": "this is an exported ExecuTorch program, not a checkpoint: use it with "
    "levit.runtime.edge.load or ExecuTorch's runtime on the device, or give the .safetensors / .pth it was exported from",
    "openvino": "this is an exported OpenVINO model, not a checkpoint: use it with OpenVINO "
    "(openvino.Core().read_model), or give the .safetensors / .pth it was exported from",
    "torchscript": "this is an exported TorchScript model, not a checkpoint: use it with torch.jit.load, "
    "or give the .safetensors / .pth it was exported from",
}
# ONNX files are a protobuf ModelProto: field 1 (ir_version, varint: tag 0x08, one byte value) and
# then another ModelProto field tag (producer name, graph, opset import, ...)
_ONNX_SECOND_TAGS = frozenset({0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42})


def exported_kind(path: Path, start: bytes) -> str | None:
    """Which exported format a file is ('onnx', 'pte', 'openvino', 'torchscript'), from its first bytes,
    its zip listing or its suffix; None for anything else. ExecuTorch programs carry the flatbuffer
    identifier ``ETnn`` at bytes 4-8."""
    suffix = path.suffix.lower()
    if suffix == ".pte" or (start[4:6] == b"ET" and start[6:8].isdigit()):
        return "pte"
    if suffix == ".onnx" or (len(start) > 2 and start[0] == 0x08 and start[1] < 0x80 and start[2] in _ONNX_SECOND_TAGS):
        return "onnx"
    if suffix == ".xml" and b"<net " in start:
        return "openvino"
    if start[:2] == b"PK":  # a zip: torch.save's, or a TorchScript archive (its constants.pkl)
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("/constants.pkl") for n in z.namelist()):
                    return "torchscript"
        except (OSError, zipfile.BadZipFile):
            return None
    return None


def _read_file(path: Path, pre: str) -> tuple[dict[str, Tensor], dict | None]:
    if path.exists() and not path.is_file():  # a device or a pipe (/dev/null): nothing to load
        raise CheckpointError(f"{pre}{path}: not a regular file, not a checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{pre}checkpoint file not found: {path}")
    with open(path, "rb") as f:
        start = f.read(512)
    head = start[:9]
    if not start:
        raise CheckpointError(f"{pre}{path}: file is empty, not a checkpoint")
    kind = exported_kind(path, start)
    if kind is not None:
        raise CheckpointError(f"{pre}{path}: {_EXPORTED[kind]}")
    if _is_text(start):
        raise CheckpointError(
            f"{pre}{path}: cannot read it as a checkpoint: it is a text file ({path.stat().st_size} bytes), "
            "not a torch .pth / .safetensors file"
        )
    if len(head) < 9:
        raise CheckpointError(f"{pre}{path}: file is truncated ({len(head)} bytes), not a checkpoint")
    # safetensors: 8-byte little-endian header length, then a JSON header; anything else goes to torch.load
    header_len = int.from_bytes(head[:8], "little")
    if not (head[8:9] == b"{" and header_len < path.stat().st_size):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pre}{path}: {_UNREADABLE} ({_short(e)})") from e
        sd, info = unwrap_state_dict(obj)
        if sd is None:
            raise CheckpointError(f"{pre}{path}: no state dict of tensors found (not a model checkpoint)")
        return sd, info
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise CheckpointError(f"{pre}{path}: {_UNREADABLE} ({_short(e)})") from e
    info = None
    if _META_KEY in meta:
        try:
            info = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{pre}{path}: corrupt levit metadata ({_short(e)})") from e
    return sd, info


def unwrap_state_dict(obj: object) -> tuple[dict[str, Tensor] | None, dict | None]:
    """The state dict inside a loaded ``.pth`` object and the levit metadata beside it.

    Accepts a bare state dict or one under ``model`` / ``state_dict`` / ``model_state_dict`` /
    ``state_dict_ema`` (training scripts' wrappers); strips DDP's ``module.`` and ``torch.compile``'s
    ``_orig_mod.`` prefixes. Returns ``(None, info)`` when no non-empty mapping of tensors is found.
    """
    info = None
    if isinstance(obj, Mapping):
        if isinstance(obj.get(_META_KEY), Mapping):
            info = dict(obj[_META_KEY])
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        return None, info
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    return sd, info


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The levit metadata (format version, variant, config, fused) of a file, or None for other formats."""
    return read_checkpoint(path)[1]


DETECTORS: list[tuple[str, Callable[[Mapping[str, Tensor]], bool]]] = [
    ("official", lambda sd: any(k.startswith("patch_embed.0.c.") for k in sd)),
    ("timm", lambda sd: "stem.conv1.linear.weight" in sd),
    ("levit", lambda sd: "stem.0.conv.weight" in sd),
    ("levit-fused", lambda sd: "stem.0.weight" in sd and any(k.endswith("attn_bias") for k in sd)),
    ("hf", lambda sd: _is_hf(sd)),
]
"""(layout name, test on the state dict's keys), tried in order. A layout other than levit's own
needs a key map in :data:`levit.weights.convert.KEY_MAPS` under the same name."""


def _is_hf(sd: Mapping[str, Tensor]) -> bool:
    from .hf import is_hf_state_dict

    return is_hf_state_dict(sd)


def detect_format(sd: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """The layout of a state dict (a name from :data:`DETECTORS`); :class:`CheckpointError` if none fits."""
    for fmt, test in DETECTORS:
        if test(sd):
            return fmt
    raise CheckpointError(
        f"{path}: not a LeViT checkpoint (none of the official 'patch_embed.0.c.weight', timm "
        f"'stem.conv1.linear.weight', Hugging Face 'levit.patch_embeddings...' or levit 'stem.0.conv.weight' keys; first key is {next(iter(sd), None)!r})"
    )


def _check_dtypes(sd: Mapping[str, Tensor], path: Path) -> None:
    """Weights must be floating point: an integer or bool tensor would load as all-0 / all-1 weights."""
    for k, v in sd.items():
        if not v.is_floating_point() and not k.endswith(_INTEGER_BUFFERS):
            raise CheckpointError(
                f"{path}: tensor {k!r} has dtype {str(v.dtype).removeprefix('torch.')}; weights must be floating "
                "point (float32, float16 or bfloat16)"
            )


@dataclass
class Checkpoint:
    """A checkpoint file read and recognised, before it is fitted to a model."""

    path: Path
    format: str  # a name from DETECTORS: official, timm, levit, levit-fused, ...
    state_dict: dict[str, Tensor]  # under the file's own names
    info: dict | None  # levit metadata, when the file has it

    @property
    def source_config(self) -> LeViTConfig | None:
        """The config the file was made with, when it says (levit and Hugging Face files): its token
        grids tell how to resample bias tables onto another input size."""
        try:
            return LeViTConfig.from_dict(self.info["config"]) if self.info else None
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def fused(self) -> bool:
        """Whether the file holds a fused model (a :class:`~levit.models.fuse.FusedLeViT` must be built)."""
        return self.format == "levit-fused"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read ``path``, detect its layout and refuse non-float weights. Raises :class:`CheckpointError`."""
    path = Path(path)
    sd, info = read_checkpoint(path)
    fmt = detect_format(sd, path)
    _check_dtypes(sd, path)
    return Checkpoint(path, fmt, sd, info)


def checkpoint_config(ck: Checkpoint, base: LeViTConfig, changes: Mapping[str, object]) -> LeViTConfig:
    """The config of the model to build for ``ck``: for levit files their saved config (which must be
    of ``base``'s variant), else ``base``; then ``changes`` on top. ``changes["ablation"]`` (a Table 5
    row) turns a plain LeViT config into that variant first; a file of another ablation is refused."""
    cfg = base
    changes = dict(changes)
    info = ck.info
    if info is not None:
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{ck.path}: levit format version {version!r} is not supported (this is {FORMAT_VERSION})"
            )
        if info.get("variant") != base.name:
            raise CheckpointError(
                f"{ck.path}: checkpoint holds {info.get('variant')}, but model {base.name} was asked for"
            )
        try:
            cfg = LeViTConfig.from_dict(info["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ck.path}: corrupt levit metadata ({_short(e)})") from e
    ablation = changes.pop("ablation", cfg.ablation)
    if ablation != cfg.ablation:  # the paper's Table 5 rows: only on top of a plain LeViT
        if cfg.ablation is not None:
            raise CheckpointError(f"{ck.path}: checkpoint holds ablation {cfg.ablation}, but {ablation} was asked for")
        from ..models.config import ablation_config

        cfg = ablation_config(cfg, ablation)
    try:
        return cfg.replace(**changes)
    except TypeError as e:
        raise ValueError(str(e)) from None


def load_into(model: nn.Module, ck: Checkpoint) -> nn.Module:
    """Load ``ck`` into ``model`` (built by :func:`levit.factory.create.create_model` from
    :func:`checkpoint_config`), strictly: names converted, heads and bias tables fitted, the first
    misfit named. Returns ``model``."""
    cfg: LeViTConfig = model.config
    if ck.format == "hf":
        from .hf import hf_to_levit_state_dict

        sd = hf_to_levit_state_dict(ck.state_dict, cfg)
    else:
        sd = to_ours(ck.state_dict, cfg, ck.format) if ck.format in KEY_MAPS else dict(ck.state_dict)
    try:
        sd = _fit_to_model(sd, model, ck.path, ck.format, ck.source_config)
    except CheckpointError as e:
        if not ck.fused and "wrong variant" in str(e):
            raise CheckpointError(_diagnose(ck.state_dict, cfg, ck.format, ck.path)) from None
        raise
    model.load_state_dict(sd, strict=True)
    info = ck.info or {}
    names = info.get("class_names")
    if isinstance(names, list) and len(names) == cfg.num_classes:
        model.class_names = [str(n) for n in names]
    _restore_preprocess(model, info, ck.path)
    return model


def _restore_preprocess(model: nn.Module, info: Mapping, path: Path) -> None:
    """The preprocessing the file says its weights expect, merged into ``model.pretrained_cfg`` in
    place: its saved ``pretrained_cfg``, and a training run's evaluation crop (``eval``) on top."""
    from ..models.network import checked_preprocess

    try:
        given = dict(info.get("pretrained_cfg") or {})
        crop = (info.get("eval") or {}).get("crop_pct")
        if crop is not None:
            given["crop_pct"] = crop
        model.pretrained_cfg.update(checked_preprocess(given))
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt levit metadata (pretrained_cfg: {_short(e)})") from None


def _resize_bias_table(t: Tensor, dst: tuple[int, int], src: tuple[int, int] | None = None) -> Tensor:
    """Resample a (H, h*w) relative-offset bias table onto the grid ``dst`` (bicubic over offsets,
    separately in each axis); ``src`` defaults to the square grid the table's length implies."""
    from ..models.layers import resample_bias_table

    if src is None or src[0] * src[1] != t.shape[1]:
        r = round(t.shape[1] ** 0.5)
        src = (r, r)
    return resample_bias_table(t.detach(), src, dst)


def _fit_to_model(
    sd: dict[str, Tensor], model: nn.Module, path: Path, fmt: str, src_cfg: LeViTConfig | None = None
) -> dict[str, Tensor]:
    """Adapt heads (num_classes / distillation), bias tables (img_size, from ``src_cfg``'s grid to
    the model's; square 224 when unknown) and ablation A5's position embedding (from ``src_cfg``'s
    grid), then check strictly."""
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
        if resizable:  # compare grids, not lengths: 6x4 and 4x6 tables have the same shape
            owner = key.rsplit(".", 1)[0]
            src = _bias_grid(src_cfg, owner) if src_cfg is not None else None
            dst = model.get_submodule(owner).resolution
            if got.shape != want.shape or (src is not None and src[0] * src[1] == got.shape[1] and src != dst):
                sd[key] = _resize_bias_table(got, dst, src)
                continue
        if key == "pos_embed" and src_cfg is not None and got.shape != want.shape and got.ndim == 3:
            from ..models.network import pos_embed_for  # ablation A5's position embedding, made at another size

            src, dst = src_cfg.grid_sizes[0], cfg.grid_sizes[0]
            if got.shape[1] == src[0] * src[1] and got.shape[2] == want.shape[2]:
                sd[key] = pos_embed_for(got.detach(), src, *dst)
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


def _bias_grid(cfg: LeViTConfig, owner: str) -> tuple[int, int] | None:
    """The key grid (h, w) of the attention at module path ``owner`` in a model built from ``cfg``."""
    m = re.fullmatch(r"stages\.(\d+)\.(downsample|blocks\.\d+)\.attn", owner)
    if m is None or int(m.group(1)) >= cfg.num_stages:
        return None
    s = int(m.group(1))
    return cfg.grid_sizes[s - 1 if m.group(2) == "downsample" else s]


def _diagnose(sd: Mapping[str, Tensor], cfg: LeViTConfig, fmt: str, path: Path) -> str:
    """One line naming the first tensor (in file order) whose name or shape differs, and the variant
    that the file does match, if any."""
    got = [(k, tuple(v.shape)) for k, v in sd.items() if not k.endswith("attention_bias_idxs")]
    exp = list(expected_shapes(cfg, fmt).items())
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
        if dict(got) == expected_shapes(other, fmt):
            return msg + f"; the file holds {name}"
    return msg + " (wrong variant?)"


# ---- saving ------------------------------------------------------------------------------------
def build_metadata(model: nn.Module, **extra: object) -> dict:
    """The self-description every levit file carries (format version, variant, config, fused or not,
    levit version, the preprocessing the weights expect, class names when the model has them), plus
    ``extra`` entries (e.g. a training run's ``eval``, whose crop becomes the preprocessing's)."""
    from ..models.network import checked_preprocess

    cfg = model.config
    meta: dict = {
        "format_version": FORMAT_VERSION,
        "variant": cfg.name,
        "config": cfg.to_dict(),
        "fused": bool(getattr(model, "is_fused", False)),
        "levit_version": __version__,
    }
    pre = getattr(model, "pretrained_cfg", None)
    if isinstance(pre, Mapping):
        checked = checked_preprocess(pre)  # edited in place by the user: checked where it is written
        meta["pretrained_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in checked.items()}
        crop = (extra.get("eval") or {}).get("crop_pct") if isinstance(extra.get("eval"), Mapping) else None
        if crop is not None:
            meta["pretrained_cfg"]["crop_pct"] = crop
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
    meta = build_metadata(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    return path
