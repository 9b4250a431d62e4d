"""Shared pytest fixtures and settings: deterministic, single-threaded-friendly CPU runs."""

import os

import pytest
import torch

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def assets_dir() -> str:
    return ASSETS
