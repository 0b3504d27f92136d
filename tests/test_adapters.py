"""Other transformers families as feature sources: tiny random models of each family, saved with
save_pretrained together with their image processor, opened by `load_model`; every listed tap's captured
value must equal what the family's own forward returns with output_hidden_states=True."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (BartConfig, BertConfig, BertModel, BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil,
                          CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, Florence2Config,
                          Florence2ForConditionalGeneration, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipVisionConfig, SiglipVisionModel,
                          ViTConfig, ViTImageProcessorPil, ViTModel)
from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

from model.loading import UnsupportedModelError, load_model
from model.presets import DEFAULT_PROMPTS, PRESETS
from workbench.taps import capture, tap_shapes

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
SQUARE = {"height": 32, "width": 32}
CROP = dict(size={"shortest_edge": 32}, crop_size=SQUARE)


def _vit_style(family: str):
    """(model, image processor) of one tiny ViT-style family member."""
    if family == "clip_vision":
        return CLIPVisionModel(CLIPVisionConfig(**VIT)), CLIPImageProcessorPil(**CROP)
    if family == "clip":
        return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VIT, projection_dim=16)), CLIPImageProcessorPil(**CROP)
    if family == "siglip_vision":
        return SiglipVisionModel(SiglipVisionConfig(**VIT)), SiglipImageProcessorPil(size=SQUARE)
    if family == "siglip":
        return SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VIT)), SiglipImageProcessorPil(size=SQUARE)
    if family == "dinov2":
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=32,
                           patch_size=8)
        return Dinov2Model(cfg), BitImageProcessorPil(**CROP)
    if family == "vit":
        return ViTModel(ViTConfig(**VIT)), ViTImageProcessorPil(size=SQUARE)
    raise KeyError(family)


def _save(tmp_path, name, model, image_processor, tokenizer=None):
    d = tmp_path / name
    model.save_pretrained(d)
    image_processor.save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


def _capture(source, pixel_values, run=None):
    """{tap: value} for every listed tap, through the workbench's own capture."""
    run = run or source.image_features
    names = list(source.tap_points())
    if run is source.image_features:
        names = [n for n in names if not n.startswith("llm.")]
    with torch.no_grad(), capture(source, names, pool="none", device=None) as cache:
        run(pixel_values)
    return dict(cache)


def _images():
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return [Image.new("RGB", (40, 36), (200, 30, 30)), Image.fromarray(noise)]


@pytest.mark.parametrize("family,expect_global", [("clip_vision", True), ("clip", True), ("siglip_vision", False),
                                                  ("siglip", False), ("dinov2", True), ("vit", True)])
def test_vit_style_taps_equal_the_family_forward(tmp_path, family, expect_global):
    torch.manual_seed(0)
    model, image_processor = _vit_style(family)
    d = _save(tmp_path, family, model.eval(), image_processor)
    source, processor = load_model(d)
    taps = source.tap_points()
    assert list(taps) == ["vision.layer0", "vision.layer1", "vision.layer2", "vision.output"]
    assert all(p.kind == "seq" and p.has_global == expect_global for p in taps.values())
    pixels = processor.images(_images())
    assert torch.equal(pixels, image_processor(images=_images(), return_tensors="pt")["pixel_values"])
    got = _capture(source, pixels)
    vision = getattr(model, "vision_model", model)
    with torch.no_grad():
        ref = vision(pixel_values=pixels, output_hidden_states=True)
    for i in range(3):
        torch.testing.assert_close(got[f"vision.layer{i}"], ref.hidden_states[i + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["vision.output"], ref.last_hidden_state, rtol=0, atol=1e-6)
    n_patches = 16
    assert got["vision.output"].shape == (2, n_patches + (1 if expect_global else 0), 32)
    shapes = tap_shapes(source, processor=processor)
    assert shapes["vision.layer1"] == (1, *got["vision.layer1"].shape[1:])


@pytest.fixture(scope="module")
def florence2_dir(tmp_path_factory):
    from model.processing import build_florence2_tokenizer

    tok = build_florence2_tokenizer()
    text = BartConfig(vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    cfg = Florence2Config(vision_config=Florence2VisionConfig(**PRESETS["tiny"]["vision"]), text_config=text,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"height": 128, "width": 128}, do_center_crop=False, resample=3)
    return _save(tmp_path_factory.mktemp("f2"), "florence2", model, ip, tok), model, tok


def test_native_florence2_taps_equal_its_own_forward(florence2_dir):
    d, model, tok = florence2_dir
    source, processor = load_model(d)
    names = list(source.tap_points())
    assert names[:5] == ["vision.stage0", "vision.stage1", "vision.stage2", "vision.stage3", "depth"]
    assert "prompt.ocr.layer1" in names and "prompt.grounding" in names
    pixels = processor.images(_images())
    got = _capture(source, pixels)
    assert set(got) == set(names)  # every listed tap fires
    with torch.no_grad():
        vision = model.model.vision_tower(pixels, output_hidden_states=True)
        depth = model.get_image_features(pixels).pooler_output
        stage_ends = torch.tensor(PRESETS["tiny"]["vision"]["depths"]).cumsum(0).tolist()
        for s, end in enumerate(stage_ends):
            torch.testing.assert_close(got[f"vision.stage{s}"], vision.hidden_states[end], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["depth"], depth, rtol=0, atol=1e-6)
        n = depth.shape[1]
        for name, text in DEFAULT_PROMPTS.items():
            ids = tok(text)["input_ids"]
            input_ids = torch.tensor([[model.config.image_token_id] * n + ids] * 2)
            ref = model(input_ids=input_ids, pixel_values=pixels, output_hidden_states=True)
            for i in range(2):
                torch.testing.assert_close(got[f"prompt.{name}.layer{i}"], ref.encoder_hidden_states[i + 1][:, :n],
                                           rtol=0, atol=1e-5)
            torch.testing.assert_close(got[f"prompt.{name}"], ref.encoder_last_hidden_state[:, :n], rtol=0, atol=1e-5)


def test_llava_taps_equal_its_own_forward(tmp_path):
    vision = dict(VIT, num_hidden_layers=2)
    text = LlamaConfig(**dict(TEXT, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_id=98,
                      image_seq_length=16, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    d = _save(tmp_path, "llava", model, CLIPImageProcessorPil(**CROP))
    source, processor = load_model(d)
    names = list(source.tap_points())
    assert names == ["vision.layer0", "vision.layer1", "projector.output", "llm.layer0", "llm.layer1"]
    pixels = processor.images(_images()[:1])
    input_ids = torch.tensor([[1, 5, *[98] * 16, 7, 8]])
    got = _capture(source, pixels, run=lambda px: source(input_ids=input_ids, pixel_values=px))
    with torch.no_grad():
        ref = model(input_ids=input_ids, pixel_values=pixels, output_hidden_states=True)
        vis = model.model.vision_tower(pixels, output_hidden_states=True)
        projected = source.image_features(pixels)
    for i in range(2):
        torch.testing.assert_close(got[f"vision.layer{i}"], vis.hidden_states[i + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["projector.output"], projected, rtol=0, atol=1e-6)
    assert got["projector.output"].shape == (1, 16, 32)  # CLS dropped ("default" feature strategy)
    torch.testing.assert_close(got["llm.layer0"], ref.hidden_states[1], rtol=0, atol=1e-6)
    # transformers' last hidden state is after the final norm; the tap is the layer's own output
    torch.testing.assert_close(model.model.language_model.norm(got["llm.layer1"]), ref.hidden_states[2],
                               rtol=0, atol=1e-6)
    assert tap_shapes(source, processor=processor)["llm.layer1"] == (1, "T", 32)


def test_fvl_taps_lists_a_family_with_shapes(tmp_path, capsys):
    from workbench.cli import main

    torch.manual_seed(0)
    model, ip = _vit_style("dinov2")
    d = _save(tmp_path, "dinov2", model, ip)
    assert main(["taps", "--model", str(d), "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)
    assert shapes == {"vision.layer0": [1, 17, 32], "vision.layer1": [1, 17, 32], "vision.layer2": [1, 17, 32],
                      "vision.output": [1, 17, 32]}
    assert main(["taps", "--model", str(d), "--match", "vision.out*"]) == 0
    assert capsys.readouterr().out.split() == ["vision.output", "(1,", "17,", "32)"]


def test_unsupported_family_is_refused_by_name(tmp_path, capsys):
    from workbench.cli import main

    d = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(d)
    with pytest.raises(UnsupportedModelError, match=r"'bert' is not supported; supported: .*CLIPModel.*Dinov2Model"):
        load_model(d)
    assert main(["taps", "--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert "'bert' is not supported" in err and "SiglipModel" in err and "Traceback" not in err


def test_fvl_taps_lists_florence2_stages_depth_and_prompts(florence2_dir, capsys):
    from workbench.cli import main

    d, _, _ = florence2_dir
    assert main(["taps", "--model", str(d), "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)
    assert shapes["vision.stage0"] == [1, 16, 32, 32] and shapes["vision.stage3"] == [1, 128, 4, 4]
    assert shapes["depth"] == shapes["prompt.ocr"] == shapes["prompt.caption.layer0"] == [1, 17, 64]
    assert len([n for n in shapes if n.startswith("prompt.")]) == 3 * (2 + 1)
