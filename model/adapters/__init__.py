"""Other transformers families as feature sources, one small adapter per family.

CLIP, SigLIP, DINOv2, ViT (`vision.layer{i}`, `vision.output`), native Florence-2 (`vision.stage{s}`,
`depth`, `prompt.*`) and LLaVA (`vision.layer{i}`, `projector.output`, `llm.layer{i}`) name their taps in
the workbench's vocabulary and implement the protocol of `model.sources`. Open them with
`model.loading.load_model(DIR)`, which detects the family from config.json.
"""
