"""Fixtures shared by tests/: the tiny world (`pec.experiments.tiny_world`) the training tests run on, a tiny
random embedded `model`, and `no_network`, which makes every socket connection fail, so that a test that would
download fails instead.

A test file that needs another world (tiny diffusers folders, a reward server) defines its own `world`
fixture, which overrides this one for that file.
"""
import socket
from pathlib import Path

import pytest
import torch

from pec.experiments.tiny_world import write_tiny_world
from pec.models.embedded import EmbeddedFlowModel

from _tiny_runs import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny world (embedded model, reward, perceptual encoder, prompts), written once per test module."""
    return write_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="module")
def model() -> EmbeddedFlowModel:
    """A tiny embedded model with random weights (`TINY`, seed 0), in eval mode, built once per test module."""
    torch.manual_seed(0)
    return EmbeddedFlowModel(TINY).eval()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to resolve a host name or open a connection raises OSError (as on a machine offline)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
