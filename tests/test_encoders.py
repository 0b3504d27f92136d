"""Every encoder kind behind the VisionEncoder interface: streams, taps, gradients, config errors, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.encoders import ENCODERS, VisionEncoder, as_pixel_values, build_encoder, load_encoder, save_encoder
from model.training.encoder_objectives import evaluate_supervised, train_clip_style, train_supervised
from workbench.data.videos import make_videos

KINDS = ["clip", "cvt", "davit", "cycle"]
_CACHE: dict[str, VisionEncoder] = {}


def encoder(kind: str) -> VisionEncoder:
    if kind not in _CACHE:
        _CACHE[kind] = build_encoder(kind, {"seed": 0})
    return _CACHE[kind]


def test_registry_lists_every_kind():
    assert set(KINDS) <= set(ENCODERS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [64, 96])
def test_forward_returns_declared_streams(kind, size):
    enc = encoder(kind)
    out = enc(torch.randn(2, 3, size, size))
    assert list(out) == enc.stream_names
    for tokens in out.values():
        assert tokens.shape == (2, enc.num_tokens(size), enc.hidden_size)
        assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("kind", KINDS)
def test_every_tap_fires_with_its_declared_shape(kind):
    enc = encoder(kind)
    size, batch = 64, 3
    expected = enc.tap_shapes(size, batch)
    taps = enc.tap_modules()
    assert set(expected) == set(taps)
    assert taps and all(name.startswith("vision.") for name in taps)
    seen: dict[str, tuple] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, tuple(o.shape)))
               for n, m in taps.items()]
    try:
        enc(torch.randn(batch, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    assert seen == expected


def test_tap_names_follow_the_design_vocabulary():
    assert list(encoder("clip").tap_modules()) == ["vision.layer0", "vision.layer1"]
    assert set(encoder("cvt").tap_modules()) == {"vision.stage0", "vision.stage1", "vision.stage2"}
    davit = encoder("davit").tap_modules()
    assert {f"vision.stage{s}" for s in range(4)} | {f"vision.block{j}" for j in range(5)} == set(davit)
    # the stage tap is the last block of its stage (depths 1, 1, 2, 1)
    assert davit["vision.stage2"] is davit["vision.block3"]
    assert davit["vision.stage2"] is encoder("davit").vision_tower.blocks[2][1]
    shapes = encoder("davit").tap_shapes(128)
    assert [shapes[f"vision.stage{s}"][1:] for s in range(4)] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_encoder_parameters(kind):
    enc = build_encoder(kind, {"seed": 1})
    out = enc(torch.randn(2, 3, 64, 64))
    loss = sum((t ** 2).mean() + t[:, 0].sum() for t in out.values())
    loss.backward()
    for name, module in enc.tap_modules().items():
        grads = [p.grad for p in module.parameters()]
        if grads:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient in tap {name}"
    first = next(p for n, p in enc.named_parameters() if "patch" in n or "conv" in n or "embedding" in n)
    assert first.grad is not None and first.grad.abs().sum() > 0
    # all but a few unused tensors (CLIP's post-layernorm, the cycle kind's objective heads) get a gradient
    used = [p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters()
            if "post_layernorm" not in n and "objective_heads" not in n]
    assert all(used)


def test_patching_a_tap_changes_the_output():
    """Taps are real call sites: replacing a stage output changes the depth stream downstream."""
    for kind, tap in (("cvt", "vision.stage1"), ("davit", "vision.stage1"), ("clip", "vision.layer0")):
        enc = encoder(kind)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            base = enc(x)["depth"]
            h = enc.tap_modules()[tap].register_forward_hook(lambda _m, _i, o: torch.zeros_like(o))
            try:
                patched = enc(x)["depth"]
            finally:
                h.remove()
        assert not torch.allclose(base, patched)


def test_seed_fixes_the_random_init():
    x = torch.randn(1, 3, 64, 64)
    a, b, c = (build_encoder("clip", {"seed": s}) for s in (3, 3, 4))
    with torch.no_grad():
        assert torch.equal(a(x)["depth"], b(x)["depth"])
        assert not torch.allclose(a(x)["depth"], c(x)["depth"])


def test_cvt_drop_path_bug_gives_a_clear_error():
    with pytest.raises(ValueError, match=r"depth\[1\]=1 <= 1 .*drop_path_rate\[1\]"):
        build_encoder("cvt", {"depth": [1, 1, 2], "drop_path_rate": [0.0, 0.1, 0.1]})


def test_cvt_shallow_stages_without_drop_path_are_made_safe():
    enc = build_encoder("cvt", {"depth": [1, 1, 1], "drop_path_rate": 0.0})
    assert [len(s.layers) for s in enc.model.encoder.stages] == [1, 1, 1]
    assert enc(torch.randn(1, 3, 64, 64))["depth"].shape == (1, 17, 64)
    # and a deep-enough config keeps drop path
    build_encoder("cvt", {"depth": [1, 2, 3], "drop_path_rate": [0.0, 0.0, 0.1]})


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder("resnet")
    with pytest.raises(ValueError, match="unknown config key"):
        build_encoder("clip", {"hidden": 32})
    with pytest.raises(ValueError, match="pretrained=True needs"):
        build_encoder("davit", {"pretrained": True})
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder("clip")(torch.randn(2, 64, 64, 3))
    with pytest.raises(ValueError, match="embed_dim has 2 entries"):
        build_encoder("davit", {"embed_dim": [16, 32]})


def test_cycle_kind_takes_hidden_size_at_the_top_level():
    enc = build_encoder("cycle", {"backbone": "clip", "hidden_size": 48})
    assert enc.hidden_size == 48 and enc(torch.randn(1, 3, 64, 64))["depth"].shape[-1] == 48
    with pytest.raises(ValueError, match="give it once"):
        build_encoder("cycle", {"hidden_size": 48, "backbone_config": {"hidden_size": 32}})


def test_save_and_load_round_trip(tmp_path):
    enc = build_encoder("cycle", {"backbone": "clip", "seed": 5})
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01)  # differ from any fresh init
    save_encoder(enc, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(x)["depth"], loaded(x)["depth"])
    with pytest.raises(FileNotFoundError, match="save_encoder"):
        load_encoder(tmp_path / "missing")


def test_as_pixel_values_converts_uint8_frames():
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[..., 0] = 255
    x = as_pixel_values(frames, size=16)
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x[:, 0], torch.full((2, 16, 16), (1 - 0.485) / 0.229))
    with pytest.raises(ValueError):
        as_pixel_values(np.zeros((2, 3, 8, 8), np.uint8))


@pytest.fixture(scope="module")
def tiny_images():
    vs = make_videos(4, 4, 2, 32, seed=3)
    return vs.frames[:, 0], vs.labels, vs.captions()


def _small_clip():
    return build_encoder("clip", {"image_size": 32, "patch_size": 8, "hidden_size": 32, "width": 32, "seed": 0})


def test_train_supervised_lowers_the_loss(tiny_images):
    images, labels, _ = tiny_images
    enc = _small_clip()
    run = train_supervised(enc, images, labels, steps=30, batch_size=16, lr=3e-3, progress=False)
    loss = run["history"]["loss"]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.2
    assert evaluate_supervised(enc, run["head"], images, labels) > 0.5


def test_train_clip_style_lowers_the_loss(tiny_images):
    images, _, captions = tiny_images
    for tower in ("clip", "bag"):
        run = train_clip_style(_small_clip(), images, captions, steps=30, batch_size=16, lr=3e-3,
                               text_tower=tower, progress=False)
        hist = run["history"]
        assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5]) - 0.2, tower
        assert all(0 < t <= 1.0 for t in hist["temperature"])
    with pytest.raises(ValueError, match="captions"):
        train_clip_style(_small_clip(), images, captions[:-1], steps=1, progress=False)


def test_pool_tokens_poolings_are_the_shared_ones():
    from model.encoders import pool_tokens

    x = torch.randn(3, 17, 8)
    assert torch.equal(pool_tokens(x, "mean"), x.mean(1))  # every token, the global one included
    assert torch.equal(pool_tokens(x, "global"), x[:, 0])
    assert torch.allclose(pool_tokens(x, "patch_mean"), x[:, 1:].mean(1))
    with pytest.raises(ValueError, match="pooling='max' is unknown"):
        pool_tokens(x, "max")
