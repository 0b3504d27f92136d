"""Florence-VL stage 1 ("pretrain") and stage 2 ("finetune"): the samples, the feature bank, the task.

What a sample is here: one LLaVA conversation tokenised with a conversation template (labels cover
the answers only). With the vision side frozen the fused image features are computed once per image
(`FeatureBank`), which is the main CPU speed-up. The loop itself is `model.training.loop.run_loop`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.loading import save_model
from model.processing import IGNORE_INDEX, DecodedImageCache, packed_attention_mask
from model.training.checkpoints import LoopHooks, finish_stage, load_weights_into
from model.training.config import TrainConfig
from model.training.loop import StageData, count_label_tokens, run_loop
from workbench.data.llava import read_llava


def qa_template(model, template: str | None = None) -> str:
    """The conversation template a model answers questions in: `template` when given, else the one the
    model was finetuned with. A model that only knows the `plain` pretraining template (which drops
    the question) is asked in `phi3`, the default chat template of this project's presets.

    The templates themselves are written out in `model.processing.template_segments` rather than taken
    from the tokenizer's chat template: the offline tokenizers built in-process carry none, and training
    needs the boundary of every answer for its label mask, which a rendered chat string does not give."""
    if template:
        return template
    return model.config.template if model.config.template != "plain" else "phi3"


def conversations_to_turns(conversations: list[dict[str, str]]) -> list[tuple[str, str]]:
    """LLaVA turns [{from: human|gpt, value}] -> [(question, answer), ...]."""
    turns: list[tuple[str, str]] = []
    q: str | None = None
    for t in conversations:
        if t["from"] == "human":
            q = t["value"]
        elif q is not None:
            turns.append((q, t["value"]))
            q = None
    return turns


@dataclass
class VLMSample:
    image: str
    input_ids: list[int]
    labels: list[int]
    segments: list[int] | None = None  # packed independent turns (see encode_independent_turns)


def load_vlm_samples(processor, llava_file: str | Path, template: str, image_folder: str | Path | None = None,
                     max_length: int | None = None, shuffle_turns_seed: int | None = None,
                     independent_turns: bool = False) -> list[VLMSample]:
    """Tokenise a LLaVA JSON file with a conversation template (labels cover answers only).

    `shuffle_turns_seed` reorders each multi-turn conversation's (question, answer) turns with a
    seeded permutation, for data whose independent questions always come in one order: trained in that
    order, a model learns "the first answer is a number" instead of reading the question, and fails on
    a lone question at test time. (`fvl data synth` already shuffles its turns per image.)

    `independent_turns` packs a conversation's turns with `encode_independent_turns` (each answer
    conditioned on the image and its own question only), for data whose questions are independent."""
    import random as _random

    samples = []
    for k, s in enumerate(read_llava(llava_file, image_folder, check_images=True)):
        if s.image_path is None:
            continue  # this model needs an image per sample
        turns = conversations_to_turns(s.conversations)
        if not turns:
            continue
        if shuffle_turns_seed is not None and len(turns) > 1:
            _random.Random(shuffle_turns_seed * 1_000_003 + k).shuffle(turns)
        segments = None
        if independent_turns and len(turns) > 1:
            ids, labels, segments = processor.encode_independent_turns(turns, template=template)
        else:
            ids, labels = processor.encode_conversation(turns, template=template)
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            segments = segments[:max_length] if segments is not None else None
        samples.append(VLMSample(str(s.image_path), ids, labels, segments))
    if not samples:
        raise ValueError(f"{llava_file} holds no samples with an image and at least one answered turn")
    return samples


class FeatureBank:
    """Fused (pre-projector) image features of a frozen vision side, computed once per image.

    Stage 2 and evaluation never change the vision side, so running it once per image instead of
    once per step is the main CPU speed-up (the vision tower costs far more than the small LLM)."""

    def __init__(self, model, processor, batch_size: int = 32, progress: bool = True):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.progress = progress
        self.index: dict[str, int] = {}
        self.features: torch.Tensor | None = None

    @torch.no_grad()  # not inference_mode: the cached tensors later feed autograd (the projector trains)
    def add(self, images: Sequence[str]) -> None:
        todo = list(dict.fromkeys(str(i) for i in images if str(i) not in self.index))
        if not todo:
            return
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        chunks = []
        for i in tqdm(range(0, len(todo), self.batch_size), desc="image features", unit="batch",
                      disable=not self.progress):
            param = next(self.model.parameters())
            px = self.processor.images(todo[i:i + self.batch_size]).to(device=param.device, dtype=param.dtype)
            chunks.append(self.model.fusion(self.model.image_streams(px)).float().cpu())
        self.model.train(was_training)
        new = torch.cat(chunks)
        base = 0 if self.features is None else self.features.shape[0]
        self.features = new if self.features is None else torch.cat([self.features, new])
        for k, path in enumerate(todo):
            self.index[path] = base + k

    def get(self, images: Sequence[str]) -> torch.Tensor:
        return self.features[[self.index[str(i)] for i in images]]


class VLMTask(nn.Module):
    """Florence-VL next-token loss (summed); image features from pixels or from a `FeatureBank`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, fused=None, segments=None,
                position_ids=None) -> torch.Tensor:
        if fused is not None:
            feats = self.model.mm_projector(fused.to(self.model.mm_projector.encoder_mlp[0].weight.dtype))
        else:
            feats = self.model.get_image_features(pixel_values)
        if segments is not None:  # packed independent turns: a 4-D mask instead of the padding mask
            impl = self.model.language_model.config._attn_implementation or "sdpa"
            attention_mask = packed_attention_mask(segments, impl, feats.dtype)
        # The LM head runs only where a next token is a label: answers are about a sixth of a packed
        # conversation (image tokens, template, questions are the rest), and the head over every
        # position cost 8-10% of a stage-2 forward + backward on CPU (`fvl bench train-step`).
        # Same loss as token_loss_sum over full logits.
        lm = self.model.language_model
        embeds = self.model.merge_image_features(input_ids, feats)
        hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def vlm_stage_data(samples: Sequence[VLMSample], processor, bank: FeatureBank | None) -> StageData:
    counts = [count_label_tokens(s.labels) for s in samples]
    pixels = DecodedImageCache() if bank is None else None  # pixels only when the vision side trains

    def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
        chosen = [samples[i] for i in idx]
        batch = processor.collate([(s.input_ids, s.labels, s.segments) for s in chosen], padding_side="right")
        if bank is not None:
            batch["fused"] = bank.get([s.image for s in chosen])
        else:
            batch["pixel_values"] = processor.images([s.image for s in chosen], cache=pixels)
        return batch

    return StageData(len(samples), make_batch, counts.__getitem__, f"{len(samples)} conversations")


def _vlm_hooks(model, processor, cfg: TrainConfig) -> LoopHooks:
    def save(d: Path) -> None:
        save_model(model, processor, d)

    def load(d: Path) -> None:
        load_weights_into(model, d / "model.safetensors")

    return LoopHooks(save, load)


def train_stage(model, processor, dataset: str | Path | Sequence[VLMSample], config: TrainConfig, *,
                bank: FeatureBank | None = None, image_folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Train a Florence-VL stage on a LLaVA file (or pre-tokenised samples); returns the loss history.

    Stage 1 ("pretrain") uses the `plain` template and trains projector + LLM (+ the vision side with
    `tune_vision`); stage 2 ("finetune") uses the model's chat template and trains projector + LLM.
    With the vision side frozen the image features are computed once per image (`FeatureBank`).
    The final model is saved to OUT/model (with trainer_state.json marking the stage finished).
    """
    cfg = config
    template = "plain" if (cfg.stage == "pretrain" and not cfg.template) else qa_template(model, cfg.template)
    if isinstance(dataset, (str, Path)):
        shuffle = cfg.seed if (cfg.shuffle_turns and template != "plain") else None
        samples = load_vlm_samples(processor, dataset, template, image_folder, cfg.max_length, shuffle,
                                   independent_turns=cfg.independent_turns and template != "plain")
    else:
        samples = list(dataset)
    if cfg.stage != "pretrain":
        # The saved model remembers its chat template, so generation and evaluation use the right one.
        model.config.template = template
        processor.template = template
    model.set_trainable(vision=cfg.tune_vision, projector=cfg.tune_projector, llm=cfg.tune_llm)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    cache = cfg.cache_features if cfg.cache_features is not None else not cfg.tune_vision
    if cache and cfg.tune_vision:
        raise ValueError("cache_features=True needs a frozen vision side; drop tune_vision or the cache")
    if cache:
        bank = bank or FeatureBank(model, processor, progress=cfg.progress)
        bank.add([s.image for s in samples])
    else:
        bank = None
    torch.manual_seed(cfg.seed)
    task = VLMTask(model)
    history = run_loop(task, vlm_stage_data(samples, processor, bank), cfg, _vlm_hooks(model, processor, cfg),
                       is_vision_param=lambda n: n.startswith("model.vision_tower."))
    model.eval()
    finish_stage(cfg, history, lambda d: _vlm_hooks(model, processor, cfg).save_model_dir(d))
    return history

