"""Vision encoders other than Florence-2's full depth+breadth extractor, behind one interface.

Why: Florence-VL's claim is about *which* visual features feed the LLM (depth + breadth from
Florence-2). To test it the workbench swaps the vision side for other encoders - a CLIP-style ViT,
CvT, the DaViT tower alone (the paper's depth-only ablation) and a cycle-contrast video encoder -
and trains each with its own objective. Every encoder here returns an ordered dict of token
streams {name: (B, N, D)} with a global token first (N = h*w + 1, like Florence-2's V) and names
the modules whose forward output is each tap, so `workbench.taps` and the fusion/LLM code never
need to know which encoder they hold.

Built on transformers' native classes (CLIPVisionModel, CvtModel, Florence2VisionBackbone +
Florence2MultiModalProjector); random init is the untrained encoder, seeded by `config["seed"]`.
Their training objectives live in `model.training` (`encoder_objectives`, `cycle_contrast`).
"""
from model.encoders.base import (IMAGE_MEAN, IMAGE_STD, POOLINGS, VisionEncoder, as_pixel_values,
                                 pool_tokens)
from model.encoders.kinds import ClipEncoder, CvtEncoder, CycleEncoder, DavitEncoder, mlp_head
from model.encoders.registry import ENCODERS, build_encoder, load_encoder, save_encoder

__all__ = ["ENCODERS", "IMAGE_MEAN", "IMAGE_STD", "POOLINGS", "ClipEncoder", "CvtEncoder", "CycleEncoder", "DavitEncoder",
           "VisionEncoder", "as_pixel_values", "build_encoder", "load_encoder", "mlp_head", "pool_tokens", "save_encoder"]
