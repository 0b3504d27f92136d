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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM and the project's offline tokenizer, saved as a hub-style directory
    (a stand-in for the paper's separate text model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.processing import build_llm_tokenizer

    tok = build_llm_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
