"""Every example in README.md and docs/*.md runs as printed: one test per fenced code block.

The rules (the docs are written to them):

- Blocks fenced as ```bash, ```sh, ```console or ```python run; ```text or a fence without a language
  is output or a table and does not (a command in such a block is an error, see
  ``test_commands_are_in_runnable_blocks``). Test ids are ``PAGE:L<line of the opening fence>``.
- ``<!-- skip: reason -->`` on the line right before a fence marks a block that cannot run here (a GPU,
  a download, a real dataset, minutes of CPU): it is reported as skipped with that reason.
- Each block runs as a reader who pastes just that block would run it: in a new working folder
  (holding the stand-ins it names) and, for Python, a fresh namespace, unless its first line is the
  comment ``# continued from the block above`` (in a shell block too): then it runs in that block's
  folder, after it, and a Python block shares its namespace (a `levit predict` on the run a
  `levit train` above made). Running one block alone (``-k``) first runs the blocks it continues.
  A top-level expression whose trailing comment is a Python literal, or starts with a
  ``torch.Size([...])``, must evaluate to it (``levit.count_params(model)  # 18893876``).
- Skipped blocks are still read as a reader pastes them: a Python block must define every name it
  uses (``test_python_blocks_define_every_name_they_use``), and going down a page, no ``levit predict``
  or ``levit train`` writes an ``--output`` that an earlier line made unless it resumes, overwrites or
  says it is refused (``test_no_block_writes_an_output_an_earlier_block_made``).
- A shell block is a list of commands (``\\`` continues a line, ``#`` starts a comment); each must be
  ``levit ...``, optionally after ``VAR=value`` settings, and runs in-process as
  ``levit.cli.main(shlex.split(line)[1:])`` with those variables set. It must exit 0, or the code a
  trailing comment names (``# exit code 2``). In ``console`` blocks only ``$ `` lines are commands.

Stand-ins keep the whole file fast and offline (no download, no minutes of training):

- Weights: a file a page names (``LeViT-256-13b5763e.pth``, ``my_model.safetensors``, a Hugging Face
  folder ``levit-128S/``) is made in its folder, only for pages that mention it: random weights of
  the right variant, in the format the name promises. ``LEVIT_PRETRAINED_URL`` points at a mirror
  folder holding the release-named files and ``TORCH_HOME`` at an empty cache, so ``pretrained=True``
  and ``--pretrained`` take the mirror route. Random stand-ins cannot carry the release's SHA-256, so
  the hash check is switched off here (``levit.weights.hub`` reads no hash from the file names);
  tests/test_checkpoint.py tests it.
- Images: ``cat.jpg``, ``img.png`` and ``photos/`` are photo-like pictures (tests/helpers.py's sample_images).
- Training: the bundled digits are cut to their first 200 images (scikit-learn's ``load_digits`` is
  wrapped) and every ``levit train`` / ``levit ablate`` run is capped at one epoch. Commands run as
  printed; the accuracies the docs' tables report need the full runs. A page that reads
  ``runs/digits/best.pth`` without training it gets it from the README's digits command.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
import re
import shlex
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
CONTINUED = "# continued from the block above"
# pages written alongside this one that may not be in every checkout yet; links to them are checked when present
PARALLEL_PAGES = {"predict.md", "serving.md", "edge.md"}

_FENCE = re.compile(r"^(\s*)(`{3,})([\w+-]*)\s*$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(.*?)\s*-->\s*$")
_EXIT = re.compile(r"#.*\bexit(?:s| code)? (\d+)\b")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:L{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """Every fenced block of a markdown page, with its language and skip reason."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        code = "\n".join(ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : j])
        prev = lines[i - 1] if i else ""
        skip = _SKIP.match(prev)
        blocks.append(Block(page, i + 1, lang.lower(), code + "\n", skip.group(1) if skip else None))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for p in PAGES for b in parse_blocks(p)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS]


# ---- stand-ins ---------------------------------------------------------------------------------
def _official_file(variant: str, path: Path) -> None:
    import torch

    import levit
    from levit.weights.convert import to_official_state_dict

    torch.manual_seed(0)
    torch.save({"model": to_official_state_dict(levit.create_model(variant))}, path)


def _hf_folder(path: Path) -> None:
    import torch

    import levit
    from levit.weights.hf import save_hf_pretrained

    torch.manual_seed(0)
    save_hf_pretrained(levit.create_model("levit_128s"), path)


def _levit_file(path: Path) -> None:
    import torch

    import levit

    torch.manual_seed(0)
    levit.save(levit.create_model("levit_tiny"), path)


def _images(path: Path, n: int, suffix: str) -> None:
    from helpers import sample_images
    from PIL import Image

    x = sample_images(n, 96, seed=3)
    files = [path] if n == 1 else [path / f"photo_{i}{suffix}" for i in range(n)]
    for f, img in zip(files, x, strict=True):
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(f)


# name in the docs -> how to make it (in the session's stand-in folder, then linked into a page's)
RELEASE_FILES = {"LeViT-128S-96703c44.pth": "levit_128s", "LeViT-256-13b5763e.pth": "levit_256"}
STANDINS = {
    **{name: (lambda p, v=v: _official_file(v, p)) for name, v in RELEASE_FILES.items()},
    "levit-128S": _hf_folder,
    "my_model.safetensors": _levit_file,
    "cat.jpg": lambda p: _images(p, 1, ".jpg"),
    "img.png": lambda p: _images(p, 1, ".png"),
    "photos": lambda p: _images(p, 3, ".jpg"),
}


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("standins")


def _standin(standin_dir: Path, name: str) -> Path:
    path = standin_dir / name
    if not path.exists():
        STANDINS[name](path)
    return path


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    if src.is_dir():
        dst.mkdir()
        for f in src.iterdir():
            _link(f, dst / f.name)
    else:
        os.link(src, dst)


# ---- the environment every block runs in ---------------------------------------------------------
@pytest.fixture
def docs_env(monkeypatch, standin_dir, tmp_path_factory):
    """Offline weights through a mirror folder, small digits, one-epoch training runs."""
    import numpy as np
    import sklearn.datasets

    import levit.train.run
    import levit.weights.hub

    for name in RELEASE_FILES:
        _standin(standin_dir, name)
    monkeypatch.setenv("LEVIT_PRETRAINED_URL", str(standin_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setattr(levit.weights.hub, "_HASH_RE", re.compile(r"(?!)"))  # names carry no hash: nothing to check

    real_digits = sklearn.datasets.load_digits

    def small_digits(*args, **kwargs):
        d = real_digits(*args, **kwargs)
        keep = np.arange(200)
        return sklearn.datasets._base.Bunch(images=d.images[keep], target=d.target[keep], data=d.data[keep])

    monkeypatch.setattr(sklearn.datasets, "load_digits", small_digits)
    real_train = levit.train.run.train

    def one_epoch(cfg, **kwargs):
        return real_train(dataclasses.replace(cfg, epochs=min(cfg.epochs, 1)), **kwargs)

    monkeypatch.setattr(levit.train.run, "train", one_epoch)
    return monkeypatch


@dataclasses.dataclass
class FolderState:
    """The working folder (and Python namespace) of a block and of the blocks that continue it."""

    folder: Path
    done: set[str] = dataclasses.field(default_factory=set)  # ids of the blocks run in it so far
    namespace: dict | None = None


_STATES: dict[str, FolderState] = {}  # the id of a chain's first block -> its folder


def _chain(block: Block) -> list[Block]:
    """``block`` and the blocks above it that it builds on, first first: each block whose first line
    is ``# continued from the block above`` adds the runnable block before it."""
    page_blocks = [b for b in RUNNABLE if b.page == block.page]
    i = page_blocks.index(block)
    chain = [block]
    while chain[0].code.startswith(CONTINUED) and i > 0:
        i -= 1
        chain.insert(0, page_blocks[i])
    return chain


def _folder_state(chain: list[Block], standin_dir: Path, tmp_path_factory) -> FolderState:
    head = chain[0]
    if head.id not in _STATES:
        folder = tmp_path_factory.mktemp(f"{head.page.stem}_L{head.line}")
        text = "".join(b.code for b in chain)
        for name in STANDINS:
            if name in text:
                _link(_standin(standin_dir, name), folder / name)
        _STATES[head.id] = FolderState(folder)
    return _STATES[head.id]


def _prepare_digits_run(chain: list[Block], folder: Path) -> None:
    """``runs/digits/best.pth`` for blocks that read it without training it (the README's command)."""
    text = "".join(b.code for b in chain)
    if "runs/digits/best.pth" in text and "--output runs/digits " not in text and not (folder / "runs/digits").exists():
        _shell(f"levit train --dataset digits --output {folder / 'runs/digits'}", "stand-in")


# ---- running blocks ----------------------------------------------------------------------------
def _shell_lines(code: str, lang: str) -> list[str]:
    raw = code.splitlines()
    if lang == "console":
        raw = [ln[2:] for ln in raw if ln.startswith("$ ")]
    lines, cur = [], ""
    for ln in raw:
        if ln.rstrip().endswith("\\"):
            cur += ln.rstrip()[:-1] + " "
            continue
        cur += ln
        if cur.strip() and not cur.strip().startswith("#"):
            lines.append(cur.strip())
        cur = ""
    return lines


def _shell(line: str, where: str) -> None:
    from levit.cli import main

    want = int(m.group(1)) if (m := _EXIT.search(line)) else 0
    words = shlex.split(line, comments=True)
    env = {}
    while words and _ENV.match(words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = os.path.expanduser(v)
    if not words or words[0] != "levit":
        pytest.fail(f"{where}: {line!r} is not a `levit` command: mark the block with <!-- skip: reason -->")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        code = main(words[1:])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == want, f"{where}: `{line}` exited {code}, expected {want}"


def _literal_comments(code: str) -> dict[int, str]:
    """Line -> text of a trailing comment that is a Python literal or a torch.Size(...)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string[1:].strip()
        if m := re.match(r"torch\.Size\(\[[\d, ]*\]\)", text):  # may be followed by an explanation
            out[tok.start[0]] = m.group(0)
            continue
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            ast.literal_eval(text)
            out[tok.start[0]] = text
    return out


def _python(block: Block, state: FolderState) -> None:
    ns = state.namespace if block.code.startswith(CONTINUED) and state.namespace is not None else {}
    ns.setdefault("__name__", "__docs__")
    tree = ast.parse(block.code, filename=block.id)
    expected = _literal_comments(block.code)
    for node in tree.body:
        mod = ast.Module(body=[node], type_ignores=[])
        code = compile(mod, f"{block.id} (line {node.lineno} of the block)", "exec")
        if isinstance(node, ast.Expr) and node.end_lineno in expected:
            value = eval(compile(ast.Expression(node.value), block.id, "eval"), ns)
            want = eval(expected[node.end_lineno], {"torch": __import__("torch")})
            assert value == want, f"{block.id}: line {node.lineno} gives {value!r}, the comment says {want!r}"
        else:
            exec(code, ns)
    state.namespace = ns


def _run(block: Block, state: FolderState) -> None:
    if block.lang in ("python", "py"):
        _python(block, state)
    else:
        for line in _shell_lines(block.code, block.lang):
            _shell(line, block.id)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_example_runs_as_printed(block: Block, docs_env, standin_dir, tmp_path_factory):
    if block.skip is not None:
        pytest.skip(block.skip)
    chain = _chain(block)
    state = _folder_state(chain, standin_dir, tmp_path_factory)
    docs_env.chdir(state.folder)
    _prepare_digits_run(chain, state.folder)
    for earlier in chain[:-1]:  # the blocks it builds on, once per folder (also when run alone, ``-k``)
        if earlier.skip is None and earlier.id not in state.done:
            _run(earlier, state)
            state.done.add(earlier.id)
    _run(block, state)
    state.done.add(block.id)


# ---- the docs' own shape -------------------------------------------------------------------------
_COMMAND_IN_OUTPUT = re.compile(r"^\s*(\$\s*)?levit (models|predict|serve|bench|train|eval|export|ablate|biases)\b")


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_commands_are_in_runnable_blocks(page: Path):
    """A ``levit`` command inside a ```text or language-less block would never be run by this file."""
    for b in parse_blocks(page):
        if b.lang not in RUN_LANGS:
            bad = [ln for ln in b.code.splitlines() if _COMMAND_IN_OUTPUT.match(ln)]
            assert not bad, f"{b.id}: commands in a block that is not run ({bad[0]!r}): fence it as ```bash"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_skip_markers_name_a_reason_and_precede_a_fence(page: Path):
    lines = page.read_text().splitlines()
    for n, ln in enumerate(lines):
        if "<!-- skip" in ln:
            m = _SKIP.match(ln)
            assert m and m.group(1), f"{page.name}:L{n + 1}: write <!-- skip: reason -->"
            nxt = lines[n + 1] if n + 1 < len(lines) else ""
            assert _FENCE.match(nxt), f"{page.name}:L{n + 1}: a skip marker must be right before a fence"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links_resolve(page: Path):
    """Relative links point at files of the repository, and their #anchors at headings there."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            if dest.name in PARALLEL_PAGES:
                continue
            pytest.fail(f"{page.name}: link to {target}: no such file")
        if anchor and dest.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
            assert anchor in headings, f"{page.name}: link to {target}: no such heading in {dest.name}"


# ---- what a reader pastes, skipped blocks included -----------------------------------------------
def _bound_names(tree: ast.AST) -> set[str]:
    """Every name a block binds anywhere (assignments, imports, definitions, loop and with targets,
    arguments, comprehension variables): scopes are not told apart, a generous reading."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _undefined_names(code: str, known: set[str]) -> list[str]:
    import builtins

    tree = ast.parse(code)
    defined = _bound_names(tree) | known | set(dir(builtins))
    used = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    return sorted({n for n in used if n not in defined})


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_python_blocks_define_every_name_they_use(page: Path):
    """A Python block, skipped here or not, runs in a new interpreter: every name it reads is imported
    or assigned in it (or in the blocks it continues, ``# continued from the block above``)."""
    known: set[str] = set()
    for b in parse_blocks(page):
        if b.lang not in ("python", "py"):
            continue
        if not b.code.startswith(CONTINUED):
            known = set()
        missing = _undefined_names(b.code, known)
        assert not missing, f"{b.id}: uses {', '.join(missing)} without defining it (a reader's NameError)"
        known |= _bound_names(ast.parse(b.code))


_OUTPUT_FLAG = re.compile(r"(?:--output|-o)[ =](\S+)")


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_no_block_writes_an_output_an_earlier_block_made(page: Path):
    """A reader going down a page, skipped blocks included, in one folder: a ``levit predict`` or
    ``levit train`` whose ``--output`` an earlier block already wrote is refused (exit code 2) unless
    it resumes or overwrites, or says that it is refused (``# exit code 2``)."""
    made: dict[str, str] = {}
    for b in parse_blocks(page):
        if b.lang not in RUN_LANGS or b.lang in ("python", "py"):
            continue
        here: set[str] = set()
        for line in _shell_lines(b.code, b.lang):
            words = shlex.split(line, comments=True)
            m = _OUTPUT_FLAG.search(" ".join(words))
            if not m or len(words) < 2 or words[:2] not in (["levit", "predict"], ["levit", "train"]):
                continue
            out = os.path.normpath(m.group(1))
            again = "--resume" in words or "--overwrite" in words or _EXIT.search(line)
            assert (out not in here and out not in made) or again, (
                f"{b.id}: `{line}` writes {out}, which {made.get(out, 'this block')} already made: the reader gets exit "
                "code 2 (use another --output, or --resume / --overwrite)"
            )
            here.add(out)
        for out in here:
            made.setdefault(out, b.id)
