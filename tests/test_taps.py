"""Taps fire with their documented shapes, equal the model's own values, and interventions are precise."""
from __future__ import annotations

import pytest
import torch

from model.loading import build_model
from workbench.taps import TapError, ablate, capture, patch, pool_tensor, resolve, tap_shapes, tap_table


def test_every_tap_fires_with_documented_shape(tiny):
    model, _ = tiny
    shapes = tap_shapes(model)
    cfg = model.config
    n, d, h = cfg.num_image_tokens(), cfg.stream_width, cfg.text_config.hidden_size
    assert shapes["depth"] == (1, n, d)
    for p in cfg.prompts:
        assert shapes[f"prompt.{p}"] == (1, n, d)
        for i in range(cfg.vision_config.text_config.encoder_layers):
            assert shapes[f"prompt.{p}.layer{i}"] == (1, n, d)
    assert shapes["fusion.input"] == (1, n, 4 * d)
    assert shapes["fusion.output"] == (1, n, h)
    vc = cfg.vision_config.vision_config
    assert [shapes[f"vision.stage{s}"][1] for s in range(4)] == list(vc.embed_dim)
    assert sum(1 for k in shapes if k.startswith("vision.block")) == sum(vc.depths)
    assert sum(1 for k in shapes if k.startswith("llm.layer")) == cfg.text_config.num_hidden_layers


def test_captured_values_equal_what_the_model_fuses(tiny):
    model, _ = tiny
    px = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        streams = model.vision_tower(px)
        with capture(model, ["depth", "prompt.*", "fusion.input", "fusion.output"]) as cache:
            feats = model.get_image_features(px)
    assert torch.equal(cache["prompt.ocr"], streams["ocr"])
    assert torch.equal(cache["depth"], streams["depth"])
    assert torch.equal(cache["fusion.output"], feats)
    fused = torch.cat([streams[k] for k in ("depth", "caption", "ocr", "grounding")], dim=-1)
    assert torch.equal(cache["fusion.input"], fused)
    # the last encoder layer under a prompt is that prompt's breadth feature
    last = model.config.vision_config.text_config.encoder_layers - 1
    torch.testing.assert_close(cache[f"prompt.grounding.layer{last}"], streams["grounding"], rtol=0, atol=0)


def test_glob_patterns_and_unknown_taps(tiny):
    model, _ = tiny
    assert resolve(model, "prompt.ocr*") == ["prompt.ocr.layer0", "prompt.ocr.layer1", "prompt.ocr"]
    assert set(resolve(model, ["vision.stage*"])) == {f"vision.stage{s}" for s in range(4)}
    with pytest.raises(TapError, match="matches nothing"):
        resolve(model, "prompt.nonexistent")


def test_a_tap_that_does_not_fire_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(TapError, match="did not fire"):
        with torch.no_grad(), capture(model, ["depth", "llm.layer0"]):
            model.get_image_features(torch.randn(1, 3, 128, 128))


def test_llm_taps_record_every_generate_step(tiny):
    model, processor = tiny
    ids, _ = processor.encode_conversation([("Q?", None)])
    input_ids = torch.tensor([ids])
    with capture(model, ["llm.layer1"], pool="none") as cache:
        model.generate(input_ids=input_ids, pixel_values=torch.randn(1, 3, 128, 128), max_new_tokens=4,
                       min_new_tokens=4, do_sample=False)
    steps = cache.steps("llm.layer1")
    assert len(steps) == 4  # prompt pass + 3 cached decoding steps
    assert steps[0].shape[1] == len(ids) and all(s.shape[1] == 1 for s in steps[1:])


@pytest.mark.parametrize("pool,shape", [("mean", (2, 64)), ("global", (2, 64)), ("grid2", (2, 4, 64)), ("none", (2, 17, 64))])
def test_pooling_shapes_and_values(tiny, pool, shape):
    model, _ = tiny
    px = torch.randn(2, 3, 128, 128)
    with torch.no_grad(), capture(model, ["depth", "vision.stage3"], pool=pool) as cache:
        model.get_image_features(px)
    with torch.no_grad(), capture(model, ["depth"], pool="none") as raw:
        model.get_image_features(px)
    assert tuple(cache["depth"].shape) == shape
    full = raw["depth"]
    if pool == "mean":
        torch.testing.assert_close(cache["depth"], full[:, 1:].mean(1))
    if pool == "global":
        assert torch.equal(cache["depth"], full[:, 0])
    if pool == "grid2":  # 4x4 patches -> 2x2 cells; cell 0 averages patches (0,0),(0,1),(1,0),(1,1)
        grid = full[:, 1:].reshape(2, 4, 4, 64)
        torch.testing.assert_close(cache["depth"][:, 0], grid[:, :2, :2].mean(dim=(1, 2)))


def test_pool_tensor_rejects_bad_pool():
    with pytest.raises(TapError):
        pool_tensor(torch.zeros(1, 5, 2), "tokens", "median")


@pytest.mark.parametrize("mode", ["zero", "mean", "noise"])
def test_ablation_changes_only_the_ablated_stream(tiny, mode):
    model, _ = tiny
    px = torch.randn(3, 3, 128, 128)
    d = model.config.stream_width
    with torch.no_grad():
        with capture(model, ["fusion.input"]) as clean:
            model.get_image_features(px)
        with ablate(model, ["ocr"], mode=mode), capture(model, ["fusion.input"]) as ablated:
            model.get_image_features(px)
    a, b = clean["fusion.input"], ablated["fusion.input"]
    slices = {"depth": (0, d), "caption": (d, 2 * d), "ocr": (2 * d, 3 * d), "grounding": (3 * d, 4 * d)}
    for name, (lo, hi) in slices.items():
        same = torch.equal(a[..., lo:hi], b[..., lo:hi])
        assert same == (name != "ocr"), name
    if mode == "zero":
        assert b[..., 2 * d:3 * d].abs().max() == 0


def test_patch_puts_one_images_stream_into_another(tiny):
    model, _ = tiny
    img_a, img_b = torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        with capture(model, ["prompt.ocr"]) as ca:
            model.get_image_features(img_a)
        with patch(model, "ocr", ca["prompt.ocr"][0]), capture(model, ["fusion.input", "prompt.caption"]) as cb:
            model.get_image_features(img_b)
        with capture(model, ["prompt.caption"]) as plain_b:
            model.get_image_features(img_b)
    d = model.config.stream_width
    assert torch.equal(cb["fusion.input"][..., 2 * d:3 * d], ca["prompt.ocr"])
    assert torch.equal(cb["prompt.caption"], plain_b["prompt.caption"])
    with pytest.raises(TapError):
        with patch(model, "ocr", torch.zeros(5, d)):
            model.get_image_features(img_b)


def test_taps_hold_for_other_presets_and_fusions():
    model, _ = build_model("tiny", fusion="token", drop_global_token=True)
    shapes = tap_shapes(model, with_llm=False)
    assert shapes["depth"] == (1, 16, 64)
    assert shapes["fusion.input"] == (1, 64, 64)
    assert "llm.layer0" in tap_table(model)
