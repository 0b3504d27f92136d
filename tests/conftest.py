"""Shared fixtures: tiny models are built once per session (tokenizer training dominates)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to oversubscription


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the tiny preset, random init, seed 0. Do not modify in tests."""
    from model.loading import build_model

    return build_model("tiny", seed=0)


@pytest.fixture
def rgb_images():
    """A square and a non-square RGB image with structure (not constant)."""
    rng = np.random.default_rng(0)
    a = Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8))
    b = Image.fromarray((rng.random((80, 130, 3)) * 255).astype(np.uint8))
    return [a, b]
