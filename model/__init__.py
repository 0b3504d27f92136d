"""Florence-VL on transformers' native classes: config and presets, depth/breadth extraction,
DBFusion, the LLaVA-style model, processing, training, conversion of official checkpoints."""
from model.encoders import ENCODERS, VisionEncoder, build_encoder
from model.selsa import SELSA
from model.builder import build_config, build_model, build_processor, load_model, save_model
from model.config import DEFAULT_PROMPTS, PRESETS, FlorenceVLConfig, preset_config
from model.florence_vl import FlorenceVLForConditionalGeneration
from model.fusion import DBFusion, Projector
from model.processing import FlorenceVLProcessor
from model.vision import Florence2DepthBreadth

__all__ = [
    "ENCODERS", "SELSA", "VisionEncoder", "build_encoder", "DEFAULT_PROMPTS", "PRESETS", "DBFusion", "Florence2DepthBreadth", "FlorenceVLConfig",
    "FlorenceVLForConditionalGeneration", "FlorenceVLProcessor", "Projector", "build_config", "build_model",
    "build_processor", "load_model", "preset_config", "save_model",
]
