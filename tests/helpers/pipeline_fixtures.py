"""Shared fixtures for the diffusers-pipeline generator tests: every tiny random family, saved and
reloaded once per session through the real loader, with the network refused throughout.

Import the fixtures into a test module (``from pipeline_fixtures import generators, one_torch_thread, ...``);
``one_torch_thread`` is autouse for the module that imports it.
"""
from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from workbench.models.random_pipelines import FAMILIES, save_random_pipeline
from workbench.models.video_pipeline import PipelineGenerator

PROMPTS = ["a red circle moving left", "a small blue square falling down"]
SEEDS = [3, 11]


@contextmanager
def network_refused() -> Iterator[None]:
    """Any socket connection raises AssertionError inside the block."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("connect", "connect_ex"):
            mp.setattr(socket.socket, name, refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings diffusers emits for tiny models (Mochi's CPU autocast, deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the tiny pipelines on one thread: their ops are too small to share, and on a busy 2-core
    machine a second OpenMP thread spins for the core the other processes hold (10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory) -> dict[str, Path]:
    """``{family: directory}``: each tiny family built with seed 0 and saved with save_pretrained."""
    root = tmp_path_factory.mktemp("pipelines")
    with network_refused(), quiet():
        return {family: save_random_pipeline(family, root / family, size="tiny", seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def generators(saved_pipelines) -> dict[str, PipelineGenerator]:
    """``{family: PipelineGenerator}`` loaded from the saved directories (shared: do not modify)."""
    torch.manual_seed(0)
    with network_refused(), quiet():
        return {family: PipelineGenerator.from_pretrained(path) for family, path in saved_pipelines.items()}
