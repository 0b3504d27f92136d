"""Conversion of official checkpoints: tiny fixtures written in the official key layouts.

The fixtures are made from directly built models: their weights are renamed into the official names by
inverting florence-vl.md section 8 (written here independently of model/convert.py), saved the way the
official repos store them, converted back, and the outputs compared for exact (bitwise) equality.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BartConfig, Florence2Config, Florence2ForConditionalGeneration, LlamaConfig, Phi3Config
from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

from model.config import FlorenceVLConfig
from model.presets import DEFAULT_PROMPTS, PRESETS
from model.florence_vl import FlorenceVLForConditionalGeneration
from model.loading import CheckpointError, convert_checkpoint, detect_layout, load_florence2, load_model
from model.loading.convert import TOWER_PREFIX
from model.loading.florence2 import FLORENCE2_TEXT_VOCAB, OFFICIAL_PROMPT_TOKEN_IDS, infer_florence2_config
from model.loading.weights import stored_dtype

TINY_VISION = dict(PRESETS["tiny"]["vision"])
TINY_BART = dict(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=1024, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, dropout=0.0)
LLM_VOCAB = 512
LLM = dict(vocab_size=LLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           tie_word_embeddings=False)


# ---- native -> official names (the inverse of the rename table) ---------------------------------
def native_to_remote(key: str) -> str:
    """A native Florence-2 key -> its microsoft/Florence-2 remote-code name."""
    if key.startswith("model.vision_tower."):
        k = "vision_tower." + key[len("model.vision_tower."):]
        if ".convs." in k:
            return k.replace(".conv.", ".proj.")
        for n in ("1", "2"):
            k = k.replace(f"_block.conv{n}.", f"_block.conv{n}.fn.dw.")
        k = k.replace("spatial_block.norm1.", "spatial_block.window_attn.norm.")
        k = k.replace("channel_block.norm1.", "channel_block.channel_attn.norm.")
        k = k.replace("window_attn.qkv.", "window_attn.fn.qkv.").replace("window_attn.proj.", "window_attn.fn.proj.")
        k = k.replace("channel_attn.qkv.", "channel_attn.fn.qkv.").replace("channel_attn.proj.", "channel_attn.fn.proj.")
        k = k.replace("_block.norm2.", "_block.ffn.norm.")
        return k.replace("ffn.fc1.", "ffn.fn.net.fc1.").replace("ffn.fc2.", "ffn.fn.net.fc2.")
    if key == "model.multi_modal_projector.image_projection.weight":
        return "image_projection"
    if key.startswith("model.multi_modal_projector."):
        return key[len("model.multi_modal_projector."):].replace("image_position_embed.", "image_pos_embed.")
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(key)


def remote_state_dict(native_sd: dict) -> dict:
    out = {}
    for k, v in native_sd.items():
        out[native_to_remote(k)] = v.t().contiguous() if k.endswith("image_projection.weight") else v.clone()
    # tensors the remote code has and the native model does not
    last = TINY_VISION["embed_dim"][-1]
    out["vision_tower.norms.weight"] = torch.ones(last)
    out["vision_tower.norms.bias"] = torch.zeros(last)
    out["language_model.final_logits_bias"] = torch.zeros(1, native_sd["model.language_model.shared.weight"].shape[0])
    return out


def remote_florence2_config(vocab: int) -> dict:
    v = TINY_VISION
    return {
        "model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config",
                     "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"},
        "vocab_size": vocab, "projection_dim": v["projection_dim"], "is_encoder_decoder": True,
        "vision_config": {"model_type": "davit", "drop_path_rate": 0.0, "patch_size": [7, 3, 3, 3],
                          "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1],
                          "patch_prenorm": [False, True, True, True], "dim_embed": list(v["embed_dim"]),
                          "num_heads": list(v["num_heads"]), "num_groups": list(v["num_groups"]),
                          "depths": list(v["depths"]), "window_size": v["window_size"],
                          "projection_dim": v["projection_dim"],
                          "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
                          "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
                          "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"], "enable_checkpoint": False},
        "text_config": dict(TINY_BART, model_type="florence2_language", vocab_size=vocab, activation_function="gelu",
                            scale_embedding=False, init_std=0.02),
    }


def tiny_florence2_config(vocab: int, image_token_id: int) -> Florence2Config:
    return Florence2Config(vision_config=Florence2VisionConfig(**TINY_VISION), text_config=BartConfig(vocab_size=vocab, **TINY_BART),
                           image_token_id=image_token_id)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norms and biases too), so a swapped or untransposed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


# ---- Florence-VL direct model and its LLaVA-layout checkpoint ------------------------------------
def direct_florence_vl(llm: str) -> FlorenceVLForConditionalGeneration:
    """phi3: Florence-2's real vocabulary size and the official prompt ids (the released-weights path);
    llama: the in-process Florence-2 tokenizer's vocabulary, prompts tokenised by it (the tokenizer path)."""
    llm_cfg = (Phi3Config(**LLM, original_max_position_embeddings=1024,
                          rope_scaling={"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                                        "short_factor": [1.0] * 8})
               if llm == "phi3" else LlamaConfig(**LLM))
    if llm == "phi3":
        vocab, prompt_ids = FLORENCE2_TEXT_VOCAB, OFFICIAL_PROMPT_TOKEN_IDS
    else:
        from model.processing import build_florence2_tokenizer

        tok = build_florence2_tokenizer()
        vocab = len(tok)
        prompt_ids = {k: tok(t)["input_ids"] for k, t in DEFAULT_PROMPTS.items()}
    cfg = FlorenceVLConfig(vision_config=tiny_florence2_config(vocab, 0), text_config=llm_cfg,
                           prompts=dict(DEFAULT_PROMPTS), prompt_token_ids=prompt_ids,
                           attend_prompt_pads=True, projector_type="mlp3x_gelu", image_token_id=LLM_VOCAB - 1,
                           image_size=128, template="phi3")
    torch.manual_seed(0)
    m = FlorenceVLForConditionalGeneration(cfg)
    randomize(m, 1)
    return m.eval()


def llava_state_dict(m: FlorenceVLForConditionalGeneration, with_tower: bool = True) -> tuple[dict, dict]:
    """(main checkpoint, bare Florence-2 tower) state dicts in the official Florence-VL names."""
    main, tower = {}, {}
    for k, v in m.state_dict().items():
        v = v.clone()
        if k.startswith("vision_tower.vision_tower."):
            tower[native_to_remote("model.vision_tower." + k[len("vision_tower.vision_tower."):])] = v
        elif k.startswith("vision_tower.multi_modal_projector."):
            tower[native_to_remote("model.multi_modal_projector." + k[len("vision_tower.multi_modal_projector."):])] = \
                v.t().contiguous() if k.endswith("image_projection.weight") else v
        elif k.startswith("vision_tower.encoder."):
            tower["language_model.model.encoder." + k[len("vision_tower.encoder."):]] = v
        elif k.startswith("mm_projector."):
            main["model." + k] = v
        elif k.startswith("language_model.model."):
            main["model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            main[k[len("language_model."):]] = v
        else:
            raise KeyError(k)
    # Florence-2 parts the features never use: shared/decoder/lm_head (tied), a decoder layer, the remote extras
    emb = tower["language_model.model.encoder.embed_tokens.weight"]
    tower["language_model.model.shared.weight"] = emb
    tower["language_model.model.decoder.embed_tokens.weight"] = emb
    tower["language_model.lm_head.weight"] = emb
    g = torch.Generator().manual_seed(5)
    tower["language_model.model.decoder.layers.0.fc1.weight"] = torch.randn(128, 64, generator=g)
    tower["language_model.model.decoder.embed_positions.weight"] = torch.randn(1026, 64, generator=g)
    tower["language_model.final_logits_bias"] = torch.zeros(1, emb.shape[0])
    tower["vision_tower.norms.weight"] = torch.ones(TINY_VISION["embed_dim"][-1])
    tower["vision_tower.norms.bias"] = torch.zeros(TINY_VISION["embed_dim"][-1])
    if with_tower:
        main.update({TOWER_PREFIX + k: v for k, v in tower.items()})
    return main, tower


def llava_config(m: FlorenceVLForConditionalGeneration, llm: str, embed_florence2: bool) -> dict:
    cfg = m.config.text_config.to_dict()
    for k in ("transformers_version", "architectures", "dtype", "rope_parameters"):
        cfg.pop(k, None)
    if llm == "phi3":
        cfg["rope_scaling"] = {"type": "longrope", "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                               "short_factor": [1.0] * 8}
        cfg["rope_theta"] = 10000.0
    cfg.update(model_type="llava_phi" if llm == "phi3" else "llava_llama",
               architectures=["LlavaPhiForCausalLM" if llm == "phi3" else "LlavaLlamaForCausalLM"],
               mm_vision_tower=f"jiuhai/florence-{'phi' if llm == 'phi3' else 'llama'}-vision-tower",
               mm_projector_type="mlp3x_gelu", mm_hidden_size=64, mm_patch_merge_type="flat",
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
               mm_use_im_patch_token=False, use_mm_proj=True, image_aspect_ratio="pad",
               tokenizer_model_max_length=2048, tokenizer_padding_side="right", torch_dtype="float32")
    if embed_florence2:
        f2 = remote_florence2_config(m.config.vision_config.text_config.vocab_size)
        cfg.update(vision_config=f2["vision_config"], text_config=f2["text_config"])
    return cfg


def write_llava_phi(tmp: Path, m) -> Path:
    """3B-style: config with the Florence-2 config embedded, sharded safetensors with an index."""
    d = tmp / "florence-vl-3b-sft"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(llava_config(m, "phi3", embed_florence2=True)))
    main, _ = llava_state_dict(m)
    # like transformers' safetensors writer: tied tensors are stored once (here: only `shared`)
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        main.pop(TOWER_PREFIX + "language_model.model." + k)
    main.pop(TOWER_PREFIX + "language_model.lm_head.weight")
    keys = sorted(main)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: main[k].contiguous() for k in ks}, str(d / fname))
        weight_map.update({k: fname for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


# What `named_parameters()` leaves out of the official stage-1 vision_tower/pytorch_model.bin: buffers (the cosine
# table, BART's final_logits_bias) and the second and later names of tied weights.
NOT_PARAMETERS = ("visual_temporal_embed.pos_idx_to_embed", "language_model.final_logits_bias",
                  "language_model.model.encoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
                  "language_model.lm_head.weight")


def write_llava_llama(tmp: Path, m, with_tower: bool = True, llm_tokenizer: bool = True,
                      parameters_only: bool = False, name: str = "florence-vl-8b-sft") -> Path:
    """8B-style: pytorch_model.bin, Florence-2 config + tokenizer in vision_tower/, LLM tokenizer at the top.
    parameters_only: the tower file as the official training script writes it (from named_parameters())."""
    from model.processing import build_florence2_tokenizer, build_llm_tokenizer

    d = tmp / name
    (d / "vision_tower").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(llava_config(m, "llama", embed_florence2=False)))
    vocab = m.config.vision_config.text_config.vocab_size
    (d / "vision_tower" / "config.json").write_text(json.dumps(remote_florence2_config(vocab)))
    (d / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 128, "width": 128}, "do_center_crop": False,
         "size": {"height": 128, "width": 128}, "resample": 3, "image_seq_length": 17}))
    main, tower = llava_state_dict(m, with_tower=with_tower)
    if parameters_only:
        tower = {k: v for k, v in tower.items() if k not in NOT_PARAMETERS}
    torch.save(main, d / "pytorch_model.bin")
    if not with_tower:
        torch.save(tower, d / "vision_tower" / "pytorch_model.bin")
    build_florence2_tokenizer().save_pretrained(d / "vision_tower")
    if llm_tokenizer:
        build_llm_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def phi_model():
    return direct_florence_vl("phi3")


@pytest.fixture(scope="module")
def llama_model():
    return direct_florence_vl("llama")


def _inputs(image_token_id: int, n_image: int):
    torch.manual_seed(3)
    px = torch.randn(2, 3, 128, 128)
    text = torch.randint(5, 400, (2, 6))
    ids = torch.cat([text[:, :2], torch.full((2, n_image), image_token_id), text[:, 2:]], dim=1)
    return px, ids


def assert_same_outputs(direct, converted, tokens: int = 577):
    n = direct.config.num_image_tokens()
    px, ids_direct = _inputs(direct.config.image_token_id, n - (1 if tokens == 576 else 0))
    _, ids_conv = _inputs(converted.config.image_token_id, n - (1 if tokens == 576 else 0))
    with torch.no_grad():
        s_direct = direct.image_streams(px)
        s_conv = converted.image_streams(px)
        assert list(s_conv) == ["depth", "caption", "ocr", "grounding"]
        for name in s_direct:
            want = s_direct[name][:, 1:] if tokens == 576 else s_direct[name]
            assert torch.equal(s_conv[name], want), name
        if tokens == 577:  # one image pass per model: features from the streams above
            f_direct = direct.mm_projector(direct.fusion(s_direct))
            f_conv = converted.mm_projector(converted.fusion(s_conv))
            assert torch.equal(f_conv, f_direct)
            logits_direct = direct(input_ids=ids_direct, image_features=f_direct).logits
            logits_conv = converted(input_ids=ids_conv, image_features=f_conv).logits
            assert logits_conv.shape[-1] >= LLM_VOCAB
            assert torch.equal(logits_conv[..., :LLM_VOCAB], logits_direct)


# =================================================================================================
# Florence-2 remote-code layout -> native
# =================================================================================================
@pytest.fixture(scope="module")
def florence2_dir(tmp_path_factory):
    vocab = 320
    torch.manual_seed(0)
    native = Florence2ForConditionalGeneration(tiny_florence2_config(vocab, vocab - 1))
    randomize(native, 2)
    native.tie_weights()
    native.eval()
    d = tmp_path_factory.mktemp("f2") / "Florence-2-tiny-ft"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(remote_florence2_config(vocab)))
    torch.save(remote_state_dict(native.state_dict()), d / "pytorch_model.bin")
    return d, native


def test_florence2_remote_layout_converts_to_native_exactly(florence2_dir):
    d, native = florence2_dir
    assert detect_layout(d).kind == "florence2-remote"
    converted, tokenizer, report = load_florence2(d)
    assert tokenizer is None
    # <image> added after the last row, vocabulary padded to a multiple of 64
    assert converted.config.image_token_id == 320
    assert converted.config.text_config.vocab_size == 384
    assert tuple(converted.config.vision_config.embed_dim) == tuple(TINY_VISION["embed_dim"])
    assert converted.config.vision_config.max_position_embeddings == 50
    assert set(report.dropped) == {"vision_tower.norms.weight", "vision_tower.norms.bias",
                                   "language_model.final_logits_bias"}
    w = converted.model.multi_modal_projector.image_projection.weight
    assert torch.equal(w, native.model.multi_modal_projector.image_projection.weight)
    torch.manual_seed(1)
    px = torch.randn(1, 3, 128, 128)
    prompt = torch.tensor([[0, 10, 11, 12, 2]])
    dec = torch.tensor([[2, 7, 9]])
    with torch.no_grad():
        ref = native(input_ids=torch.cat([torch.full((1, 17), 319), prompt], 1), pixel_values=px, decoder_input_ids=dec)
        out = converted(input_ids=torch.cat([torch.full((1, 17), 320), prompt], 1), pixel_values=px,
                        decoder_input_ids=dec)
    assert torch.equal(out.encoder_last_hidden_state, ref.encoder_last_hidden_state)
    assert torch.equal(out.logits[..., :320], ref.logits)


def test_fvl_convert_florence2_writes_native_layout(florence2_dir, tmp_path):
    from workbench.cli import main

    d, native = florence2_dir
    out = tmp_path / "native"
    assert main(["convert", "--src", str(d), "--out", str(out), "--kind", "florence2"]) == 0
    reloaded = Florence2ForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.image_token_id == 320
    report = json.loads((out / "conversion.json").read_text())
    assert report["layout"] == "florence2-remote"
    px = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(reloaded.model.get_image_features(px).pooler_output,
                           native.model.get_image_features(px).pooler_output)
    # wrong kind is refused with a clear message
    with pytest.raises(CheckpointError, match="not Florence-VL"):
        convert_checkpoint(d, tmp_path / "x", kind="florence-vl")


def test_florence2_opens_as_feature_source_or_with_a_preset_llm(florence2_dir):
    d, _ = florence2_dir
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_model(d)  # a feature source preprocesses with the checkpoint's own image processor
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(d, llm_preset="tiny")  # a toy vocabulary: the official prompt ids do not apply
    ids = {"caption": [0, 7, 8, 2], "ocr": [0, 9, 2], "grounding": [0, 10, 11, 12, 2]}
    model, processor = load_model(d, llm_preset="tiny", prompt_token_ids=ids)
    assert "RANDOM-INIT" in " ".join(model.conversion_report.notes)
    with torch.no_grad():
        streams = model.image_streams(torch.randn(1, 3, 128, 128))
    assert streams["caption"].shape == (1, 17, 64)
    assert processor is None  # no Florence-2 tokenizer in the directory


def test_unknown_remote_key_is_refused(tmp_path, florence2_dir):
    d, native = florence2_dir
    sd = remote_state_dict(native.state_dict())
    sd["vision_tower.blocks.0.0.spatial_block.window_attn.fn.rel_bias"] = torch.zeros(3)
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="rel_bias"):
        load_florence2(tmp_path)


# =================================================================================================
# Florence-VL LLaVA layout -> FlorenceVLForConditionalGeneration
# =================================================================================================
def test_llava_phi_checkpoint_matches_direct_model(phi_model, tmp_path):
    d = write_llava_phi(tmp_path, phi_model)
    assert detect_layout(d).kind == "florence-vl-llava"
    with pytest.raises(ValueError, match="load_model"):  # the model class opens only this project's layout
        FlorenceVLForConditionalGeneration.from_pretrained(d)
    converted, _ = load_model(d)
    cfg = converted.config
    assert cfg.text_config.model_type == "phi3"
    assert cfg.prompt_token_ids == OFFICIAL_PROMPT_TOKEN_IDS and cfg.attend_prompt_pads
    assert cfg.vision_config.text_config.vocab_size == 51328 and cfg.vision_config.image_token_id == 51289
    assert cfg.pad_to_square and cfg.template == "phi3" and not cfg.drop_global_token
    # 14 = the official padded prompt length; all positions attended
    assert converted.vision_tower.prompt_ids.shape == (3, 14) and converted.vision_tower.attend_prompt_pads
    assert converted.vision_tower.prompt_ids[1, -4:].tolist() == [1, 1, 1, 1]
    assert cfg.image_token_id == LLM_VOCAB and cfg.text_config.vocab_size == 576
    assert converted.config.text_config.rope_parameters["rope_type"] == "longrope"
    notes = " ".join(converted.conversion_report.notes)
    assert "decoder" in notes and "official hard-coded" in notes
    assert_same_outputs(phi_model, converted)


def test_llava_llama_bin_with_tokenizers_and_576_tokens(llama_model, tmp_path):
    d = write_llava_llama(tmp_path, llama_model)
    model, processor = load_model(d)
    assert model.config.text_config.model_type == "llama" and model.config.template == "llama3"
    assert processor is not None and processor.template == "llama3"
    assert processor.image_token_id == model.config.image_token_id == 4  # the tokenizer's own <image>
    assert model.config.text_config.vocab_size == LLM_VOCAB  # no resize needed
    assert model.config.vision_config.text_config.vocab_size == 2048  # 2013 tokens padded to a multiple of 64
    assert any("tokenised with the checkpoint's Florence-2 tokenizer" in n for n in model.conversion_report.notes)
    assert_same_outputs(llama_model, model)
    m576, _ = load_model(d, tokens=576)
    assert m576.config.drop_global_token and m576.config.num_image_tokens() == 16
    assert_same_outputs(llama_model, m576, tokens=576)


def test_stage1_layout_with_separate_vision_tower_weights(llama_model, tmp_path):
    d = write_llava_llama(tmp_path, llama_model, with_tower=False, llm_tokenizer=False)
    model, processor = load_model(d)
    assert processor is None
    assert any("no processor" in n for n in model.conversion_report.notes)
    assert any("Florence-2 weights read from" in n for n in model.conversion_report.notes)
    assert_same_outputs(llama_model, model)


def test_stage1_tower_saved_from_named_parameters_converts_without_allow_missing(llama_model, tmp_path):
    """The official stage-1 layout: the tower only in vision_tower/pytorch_model.bin, without buffers."""
    d = write_llava_llama(tmp_path, llama_model, with_tower=False, parameters_only=True,
                          name="florence-vl-8b-pretrain")
    tower = torch.load(d / "vision_tower" / "pytorch_model.bin", weights_only=True)
    assert not any(k.endswith(NOT_PARAMETERS) for k in tower)
    model, processor = load_model(d)
    report = model.conversion_report
    assert report.missing == [] and len(report.rebuilt) == 1 and "visual_temporal_embed" in report.rebuilt[0]
    assert any("final_logits_bias absent" in n for n in report.notes)
    assert_same_outputs(llama_model, model)
    # stage 1 was trained on the plain template, with the official token convention
    assert model.config.template == "plain" and processor.convention == "official"
    ids, labels = processor.encode_conversation([("", "a red circle")])
    tok = processor.llm_tokenizer
    assert tok.eos_token_id not in ids  # no EOS after the caption
    assert ids[-1] == tok("\n", add_special_tokens=False)["input_ids"][-1]
    out = tmp_path / "converted"
    report = convert_checkpoint(d, out)
    assert "visual_temporal_embed" in " ".join(json.loads((out / "conversion.json").read_text())["rebuilt"])
    assert load_model(out)[1].convention == "official"  # the convention travels with the converted model


def test_official_token_convention_matches_llava(tmp_path):
    """BOS only where the tokenizer adds one; Llama-3's template keeps its literal <|begin_of_text|> after it;
    Phi-3 turns joined as LLaVA's get_prompt joins them; the square-pad colour int(255 * mean)."""
    from PIL import Image

    from model.processing import FlorenceVLProcessor, build_florence2_tokenizer, build_llm_tokenizer, square_fill

    llm, f2 = build_llm_tokenizer(), build_florence2_tokenizer()

    def proc(tokenizer, template, convention):
        return FlorenceVLProcessor(tokenizer, f2, image_size=32, num_image_tokens=2, template=template,
                                   pad_to_square=True, convention=convention)

    from tokenizers.processors import TemplateProcessing

    no_bos = llm  # the in-process tokenizer adds no special tokens itself
    with_bos = build_llm_tokenizer()
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert with_bos("a")["input_ids"][0] == 1 and no_bos("a")["input_ids"][0] != 1
    begin = llm.convert_tokens_to_ids("<|begin_of_text|>")
    assert proc(with_bos, "llama3", "official").encode_conversation([("Q?", None)])[0][:2] == [1, begin]
    assert proc(no_bos, "llama3", "official").encode_conversation([("Q?", None)])[0][0] == begin
    assert proc(with_bos, "phi3", "official").encode_conversation([("Q?", "A.")])[0][0] == 1
    ids, _ = proc(no_bos, "phi3", "official").encode_conversation([("Q?", "A.")])
    assert ids[0] != 1  # Phi-3: no BOS unless the tokenizer adds it
    assert proc(no_bos, "phi3", "project").encode_conversation([("Q?", "A.")])[0][0] == 1
    text = no_bos.decode(ids)
    assert text.endswith("A.<|end|>") and "<|end|>\n<|assistant|>\n" in text and text.startswith("<|system|>")
    assert square_fill("official") == (123, 116, 103) and square_fill("project") == (124, 116, 104)
    wide = Image.new("RGB", (32, 16), (255, 255, 255))
    px_official = proc(llm, "plain", "official").images([wide])
    px_project = proc(llm, "plain", "project").images([wide])
    assert not torch.equal(px_official[:, :, 0, 0], px_project[:, :, 0, 0])  # the padded corner differs


def test_fvl_convert_writes_our_layout(phi_model, tmp_path):
    from workbench.cli import main

    src = write_llava_phi(tmp_path, phi_model)
    out = tmp_path / "converted"
    assert main(["convert", "--src", str(src), "--out", str(out), "--tokens", "577"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "florence_vl"
    assert json.loads((out / "conversion.json").read_text())["layout"] == "florence-vl-llava"
    model, _ = load_model(out)
    assert detect_layout(out).kind == "florence_vl"
    assert_same_outputs(phi_model, model)


def test_missing_and_unexpected_keys_are_refused(llama_model, tmp_path):
    d = write_llava_llama(tmp_path, llama_model, llm_tokenizer=False)
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd.pop("model.layers.1.mlp.down_proj.weight")
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing tensors: language_model\.model\.layers\.1\.mlp\.down_proj"):
        load_model(d)
    partial, _ = load_model(d, allow_missing=True)
    assert partial.conversion_report.missing == ["language_model.model.layers.1.mlp.down_proj.weight"]
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 128)
    sd["model.image_newline"] = torch.zeros(64)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unexpected.*image_newline"):
        load_model(d)
    sd.pop("model.image_newline")
    sd["model.mm_projector.encoder_mlp.0.weight"] = torch.zeros(64, 128)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="projector takes 128 channels"):
        load_model(d)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_are_never_executed(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(remote_florence2_config(320)))
    with open(tmp_path / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_florence2(tmp_path)
    assert "this must never run" not in capsys.readouterr().out


def test_hub_id_without_network_names_repo_and_local_fix(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as err:
        load_model("jiuhai/florence-vl-3b-sft")
    msg = str(err.value)
    assert "jiuhai/florence-vl-3b-sft" in msg and "--local-dir" in msg and "local directory" in msg


def test_hub_id_resolved_through_huggingface_hub(monkeypatch, phi_model, tmp_path):
    import huggingface_hub

    d = write_llava_phi(tmp_path, phi_model)
    calls = []

    def snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs["local_files_only"]))
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model, _ = load_model("jiuhai/florence-vl-3b-sft")
    assert calls == [("jiuhai/florence-vl-3b-sft", True)]  # the local cache is tried first
    assert model.config.text_config.model_type == "phi3"


def test_real_size_florence2_config_is_inferred_from_shapes():
    from model.presets import FLORENCE2_LARGE_VISION

    sd = {f"model.vision_tower.convs.{i}.conv.weight": torch.empty(c, 1, 1, 1)
          for i, c in enumerate(FLORENCE2_LARGE_VISION["embed_dim"])}
    for s, depth in enumerate(FLORENCE2_LARGE_VISION["depths"]):
        for j in range(depth):
            sd[f"model.vision_tower.blocks.{s}.{j}.spatial_block.conv1.weight"] = torch.empty(1)
    sd["model.multi_modal_projector.image_projection.weight"] = torch.empty(1024, 2048)
    for i in range(12):
        sd[f"model.language_model.encoder.layers.{i}.fc1.weight"] = torch.empty(1)
    sd["model.language_model.shared.weight"] = torch.empty(51289, 1)
    cfg = infer_florence2_config(sd)
    assert cfg["vision_config"]["num_heads"] == (8, 16, 32, 64) and cfg["text_config"]["encoder_attention_heads"] == 16
    assert cfg["text_config"]["vocab_size"] == 51289
    sd["model.multi_modal_projector.image_projection.weight"] = torch.empty(512, 2048)
    assert infer_florence2_config(sd) is None


def test_dtype_defaults_to_the_stored_one(phi_model, tmp_path):
    assert stored_dtype({"a": torch.zeros(10, dtype=torch.bfloat16), "b": torch.zeros(3),
                              "i": torch.zeros(50, dtype=torch.long)}) == torch.bfloat16
    d = write_llava_phi(tmp_path, phi_model)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    for shard in set(index["weight_map"].values()):  # a bf16 release, like the official SFT shards
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(d / shard)).items()}, str(d / shard))
    model, _ = load_model(d)
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16 and model.vision_dtype == torch.bfloat16
    assert load_model(d, dtype="float32")[0].vision_dtype == torch.float32
