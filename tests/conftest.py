"""Shared fixtures (the helpers themselves live in tests/helpers.py)."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from helpers import tiny_model
from torch import nn

# OpenVINO's and NNCF's usage telemetry is on unless the user opted out; each event is sent from a
# forked copy of the sending process (a copy of every page table of a process holding torch and the
# models). Their documented switches for CI runs turn it off here and in the processes tests start.
os.environ.setdefault("CI", "true")
os.environ.setdefault("NNCF_CI", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in several processes (README: pytest-xdist's ``-n``): one torch thread each, so
    # that they do not fight over the cores
    torch.set_num_threads(1)


@pytest.fixture
def tiny() -> nn.Module:
    """A randomised 64-px levit_tiny in eval mode (a new one per test)."""
    return tiny_model(seed=1)


# the files start in the order of their cost (CPU seconds on the 2-core development machine, the
# longest tests first: Ray clusters, ExecuTorch lowering, servers, training runs), so that the short
# files fill both processes up to the end instead of one process finishing a long file alone; files
# not listed (about a second each) come last
_LONG_FIRST = (
    "test_serve",
    "test_serve_ray",
    "test_pipeline",
    "test_edge",
    "test_elastic",
    "test_deploy",
    "test_train",
    "test_cli_speed",
    "test_docs",
    "test_newcomer",
    "test_field",
    "test_export",
    "test_fuse",
    "test_preprocess",
    "test_structure",
    "test_hfds",
    "test_teacher_cache",
    "test_parity",
    "test_ablations",
    "test_data",
    "test_hf",
    "test_shards",
    "test_first_use",
    "test_ablate",
    "test_checkpoint",
    "test_shapes",
    "test_backbone",
    "test_model",
    "test_benchmark",
    "test_ray_reaper",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Costly files first (a stable sort: the order inside a file is kept)."""
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """The objects alive once the test files are imported (torch and the other libraries) are frozen
    out of the cyclic garbage collector: the full collections some tests and the field suite's memory
    release run then scan only what the tests made, not every object of every imported library."""
    gc.collect()
    gc.freeze()
