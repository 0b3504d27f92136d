"""The Florence-VL model: shapes, equivalence with native Florence-2, fusion, save/load, generate, training."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.loading import build_model, load_model, save_model
from model.presets import DEFAULT_PROMPTS
from model.reference import native_from_extractor, naive_streams


def test_token_counts_577_and_576():
    for drop, expected in ((False, 577), (True, 576)):
        model, _ = build_model("tiny", image_size=768, drop_global_token=drop)
        assert model.config.num_image_tokens() == expected
        with torch.no_grad():
            streams = model.image_streams(torch.randn(1, 3, 768, 768))
        assert list(streams) == ["depth", "caption", "ocr", "grounding"]
        for s in streams.values():
            assert s.shape == (1, expected, 64)


def test_global_token_is_first_and_dropped(tiny):
    model, _ = tiny
    px = torch.randn(1, 3, 128, 128)
    dropped, _ = build_model("tiny", drop_global_token=True)
    dropped.load_state_dict(model.state_dict())
    with torch.no_grad():
        full = model.image_streams(px)
        short = dropped.image_streams(px)
    for name in full:
        torch.testing.assert_close(full[name][:, 1:], short[name], rtol=0, atol=0)


def test_breadth_equals_native_encoder_for_each_prompt(tiny, rgb_images):
    """Batched, masked prompts give exactly what native Florence-2 gives one prompt at a time."""
    model, processor = tiny
    px = processor.images(rgb_images)  # one square, one non-square image
    native = native_from_extractor(model.vision_tower)
    with torch.no_grad():
        ours = model.vision_tower(px)
        ref = naive_streams(native, px, model.config.prompt_token_ids)
    assert set(ours) == set(ref) == {"depth", *DEFAULT_PROMPTS}
    for name in ref:
        assert ours[name].shape == ref[name].shape
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-5, name


def test_default_prompts_are_florence2_texts(tiny):
    model, processor = tiny
    assert model.config.prompts["caption"] == "Describe in detail what is shown in the image."
    assert model.config.prompts["ocr"] == "What is the text in the image?"
    assert model.config.prompts["grounding"] == "Locate the objects in the image, with their descriptions."
    ids = processor.florence2_tokenizer(model.config.prompts["ocr"])["input_ids"]
    assert model.config.prompt_token_ids["ocr"] == ids and ids[0] == 0 and ids[-1] == 2


def test_custom_prompts_give_custom_streams():
    model, _ = build_model("tiny", prompts={"count": "How many objects are there?", "ocr": "What is the text in the image?"})
    with torch.no_grad():
        streams = model.image_streams(torch.randn(2, 3, 128, 128))
    assert list(streams) == ["depth", "count", "ocr"]
    assert model.mm_projector.encoder_mlp[0].in_features == 3 * 64


@pytest.mark.parametrize("fusion,tokens,width", [("channel", 17, 256), ("token", 68, 64), ("average", 17, 64)])
def test_fusion_modes_and_projector_widths(fusion, tokens, width):
    model, _ = build_model("tiny", fusion=fusion)
    assert model.config.num_image_tokens() == tokens
    assert model.mm_projector.encoder_mlp[0].in_features == width
    with torch.no_grad():
        feats = model.get_image_features(torch.randn(2, 3, 128, 128))
    assert feats.shape == (2, tokens, model.config.text_config.hidden_size)


@pytest.mark.parametrize("kind,n_linear", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_parameter_names_follow_official_layout(kind, n_linear):
    model, _ = build_model("tiny", projector_type=kind)
    keys = [k for k in model.state_dict() if k.startswith("mm_projector.")]
    expected = {"mm_projector.encoder_mlp.0.weight", "mm_projector.encoder_mlp.0.bias"}
    for k in range(1, n_linear):
        expected |= {f"mm_projector.encoder_mlp.{k}.1.weight", f"mm_projector.encoder_mlp.{k}.1.bias"}
    assert set(keys) == expected


def test_save_load_round_trip_identical_logits(tiny, tmp_path, rgb_images):
    model, processor = tiny
    save_model(model, processor, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, loaded_proc = load_model(tmp_path / "m")
    batch = processor(rgb_images, ["What is this?"] * 2, ["A red circle."] * 2)
    batch2 = loaded_proc(rgb_images, ["What is this?"] * 2, ["A red circle."] * 2)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch2).logits
    assert torch.equal(a, b)


def test_generate_is_deterministic_and_returns_new_tokens(tiny, rgb_images):
    model, processor = tiny
    batch = processor(rgb_images, ["What is in the image?"] * 2)
    out1 = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)
    out2 = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)
    assert out1.shape == (2, 6)
    assert torch.equal(out1, out2)


def test_generate_computes_image_features_once(tiny, rgb_images):
    model, processor = tiny
    calls = []
    handle = model.vision_tower.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = processor(rgb_images[:1], ["Describe."])
        model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_placeholder_mismatch_is_a_clear_error(tiny):
    model, processor = tiny
    ids, _ = processor.encode_conversation([("q", None)])
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=torch.tensor([ids[:-5] + ids[-3:]]), pixel_values=torch.randn(2, 3, 128, 128))


def test_training_step_gradients_follow_trainable_parts(rgb_images):
    model, processor = build_model("tiny")
    model.train()
    batch = processor(rgb_images, ["What is this?"] * 2, ["A blue square."] * 2)
    for vision in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_trainable(vision=vision, projector=True, llm=True)
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert model.mm_projector.encoder_mlp[0].weight.grad.abs().sum() > 0
        assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0
        davit_grad = model.vision_tower.vision_tower.convs[0].conv.weight.grad
        enc_grad = model.vision_tower.encoder.layers[0].fc1.weight.grad
        if vision:
            assert davit_grad is not None and davit_grad.abs().sum() > 0
            assert enc_grad is not None and enc_grad.abs().sum() > 0
        else:
            assert davit_grad is None and enc_grad is None


def test_gradient_checkpointing_gives_same_gradients(rgb_images):
    model, processor = build_model("tiny")
    model.train()
    model.set_trainable(vision=True)
    batch = processor(rgb_images, ["Q?"] * 2, ["A cat."] * 2)
    model(**batch).loss.backward()
    ref = model.vision_tower.vision_tower.convs[0].conv.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    model(**batch).loss.backward()
    torch.testing.assert_close(model.vision_tower.vision_tower.convs[0].conv.weight.grad, ref, rtol=1e-4, atol=1e-6)


def test_labels_cover_only_answers(tiny):
    _, processor = tiny
    for template in ("plain", "phi3", "llama3"):
        ids, labels = processor.encode_conversation([("What colour?", "red")], template=template)
        trained = [i for i, l in zip(ids, labels) if l != -100]
        text = processor.llm_tokenizer.decode(trained)
        assert text.startswith("red"), (template, text)
        assert "What" not in text and "<image>" not in text
        assert ids.count(processor.image_token_id) == processor.num_image_tokens


def test_real_size_presets_build_on_meta_and_match_published_counts():
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "info", "--preset", "florence-vl-3b", "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert abs(info["llm"] / 3.82e9 - 1) < 0.01
    assert abs(info["florence2_total_with_decoder"] / 0.7702e9 - 1) < 0.01
    assert info["total"] == info["vision_tower"] + info["florence2_encoder"] + info["projector"] + info["llm"]
    model, _ = build_model("florence-vl-8b", device="meta")
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert abs(llm / 8.03e9 - 1) < 0.01
    assert next(model.parameters()).device.type == "meta"


def test_config_fingerprint_survives_save_and_load(tiny, tmp_path):
    model, processor = tiny
    save_model(model, processor, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.fingerprint() == model.config.fingerprint()
    other, _ = build_model("tiny", fusion="average")
    assert other.config.fingerprint() != model.config.fingerprint()


def test_decoded_image_cache_gives_identical_pixels_and_respects_its_bound(rgb_images, tmp_path):
    """Training decodes each image file once; the pixels are bit-identical to decoding every time, and
    the normalisation is the reference (u / 255 - mean) / std in float32."""
    from model.processing import IMAGENET_MEAN, IMAGENET_STD, DecodedImageCache, preprocess_images

    paths = []
    for i, img in enumerate(rgb_images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    u8 = np.stack([np.asarray(Image.open(p).convert("RGB").resize((48, 48), Image.BICUBIC)) for p in paths])
    reference = (torch.from_numpy(u8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
                 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cache = DecodedImageCache()
    first = preprocess_images(paths, 48, cache=cache)
    again = preprocess_images(paths + [rgb_images[0]], 48, cache=cache)  # a PIL image is never cached
    assert torch.equal(first, reference) and torch.equal(again[:2], reference)
    assert first.is_contiguous() and first.dtype == torch.float32
    assert len(cache) == 2 and cache.nbytes == 2 * 48 * 48 * 3
    small = DecodedImageCache(max_bytes=48 * 48 * 3)  # room for one image: the second is decoded each time
    assert torch.equal(preprocess_images(paths, 48, cache=small), reference) and len(small) == 1


def test_from_pretrained_is_a_thin_alias_for_this_projects_layout(tiny, tmp_path, rgb_images):
    """`load_model` is the one way in; the model class's own from_pretrained still opens our layout (prompt
    buffers restored) and refuses any other with a pointer to load_model."""
    from model.florence_vl import FlorenceVLForConditionalGeneration

    model, processor = tiny
    save_model(model, processor, tmp_path / "m")
    again = FlorenceVLForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again.vision_tower.prompt_ids, model.vision_tower.prompt_ids)
    px = processor.images(rgb_images[:1])
    with torch.no_grad():
        assert torch.equal(again.get_image_features(px), model.get_image_features(px))
    loaded, loaded_processor = load_model(tmp_path / "m", dtype="bfloat16")
    assert loaded.vision_dtype == torch.bfloat16 and loaded_processor.convention == "project"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="load_model"):
        FlorenceVLForConditionalGeneration.from_pretrained(other)
