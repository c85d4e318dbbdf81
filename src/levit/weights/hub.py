"""Released weights: download into the torch hub cache and check the SHA-256 their file names carry.

The authors' files are named ``NAME-<hex>.pth`` where ``<hex>`` is a prefix of the file's SHA-256
(the torch hub convention). Every file served from the cache is checked against it, whether this
module downloaded it or someone put it there by hand.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import CheckpointError
from ..models.config import PAPER_RESULTS
from ..utils import atomic_path

__all__ = ["check_hash", "default_cache_dir", "download_checkpoint", "download_pretrained", "mirror_url"]

_HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.\w+$")
#: how an offline error says to use a file at hand (``levit train`` names its own key instead)
PASS_A_FILE = "or pass checkpoint=PATH (--checkpoint PATH)"


def default_cache_dir() -> Path:
    """The folder released weights are cached in: ``$TORCH_HOME/hub/checkpoints`` (torch's own)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def check_hash(path: str | os.PathLike, digest: str | None = None) -> None:
    """Raise :class:`CheckpointError` (naming the file and both hashes) unless the SHA-256 of ``path``
    starts with the hex prefix in its name (``NAME-<hex>.pth``), or with ``digest`` when given.
    Files whose names carry no hash are not checked."""
    path = Path(path)
    want = digest or (m.group(1) if (m := _HASH_RE.search(path.name)) else None)
    if want is None:
        return
    got = _sha256(path)
    if not got.startswith(want):
        raise CheckpointError(
            f"{path} has SHA-256 {got[: max(12, len(want))]}..., expected {want}...: the file is corrupt or not "
            "the released one; delete it to download it again"
        )


def download_checkpoint(url: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` into the torch hub cache (reused when present) and check the SHA-256 prefix
    that the file name carries (``NAME-<hex>.pth``), for downloaded and cached files alike.
    Raises :class:`CheckpointError` when offline or on a hash mismatch."""
    fname = url.rsplit("/", 1)[-1]
    dst = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = dst / fname
    if target.is_file():
        check_hash(target)
        return target
    m = _HASH_RE.search(fname)
    try:
        with atomic_path(target) as tmp:
            sha = _fetch(url, tmp, fname, progress)
            if m and not sha.startswith(m.group(1)):
                raise CheckpointError(
                    f"downloaded {fname} has SHA-256 {sha[:12]}..., expected {m.group(1)}...: file corrupted in transit"
                )
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(
            f"cannot download {url} ({reason}); fetch it elsewhere and put it at {target}, {PASS_A_FILE}"
        ) from e
    return target


def _fetch(url: str, dest: Path, desc: str, progress: bool) -> str:
    """Stream ``url`` into ``dest``; returns the SHA-256 hex digest of what was written."""
    sha = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=30) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
        while chunk := r.read(1 << 20):
            f.write(chunk)
            sha.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    return sha.hexdigest()


def download_pretrained(name: str) -> Path:
    """Path to the official released weights of the variant ``name`` (a registered name, e.g.
    ``levit_128s``), downloaded once into the torch hub cache and hash-checked on every use.

    ``LEVIT_PRETRAINED_URL`` may name a mirror holding the same file names: a folder or a URL
    (:func:`mirror_url`).
    """
    if name not in PAPER_RESULTS:
        raise CheckpointError(f"no released weights for {name}; released: {', '.join(PAPER_RESULTS)}")
    url = PAPER_RESULTS[name].url
    mirror = os.environ.get("LEVIT_PRETRAINED_URL")
    if mirror:
        url = mirror_url(mirror, url.rsplit("/", 1)[-1])
    return download_checkpoint(url)


def mirror_url(mirror: str, fname: str) -> str:
    """The URL of ``fname`` in a mirror of the release files: ``mirror`` is a URL (``https://...``,
    ``file:///srv/weights``) or a local folder (``/srv/weights``, ``~/weights``, relative paths)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", mirror):
        return mirror.rstrip("/") + "/" + fname
    return (Path(mirror).expanduser().resolve() / fname).as_uri()
