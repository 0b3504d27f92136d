"""Florence-2-style multi-task pretraining of a small Florence-2 (DaViT + BART).

Florence-2 learns every task as text generation: the encoder reads [image tokens ; task prompt],
the decoder writes the target (a caption, the OCR string, or regions as `label<loc_x0><loc_y0>
<loc_x1><loc_y1>` with 1000 location bins). Here the full native
`transformers.Florence2ForConditionalGeneration` (decoder included) is trained on the synthetic
scenes' Florence-2 tasks, then its vision tower, projector and BART encoder are copied into the
Florence-VL extractor (`model.vision.florence2_state_dict_to_extractor`), the way Florence-VL
starts from a pretrained Florence-2.

Two things make this work at CPU scale:
  * One step runs DaViT ONCE per image and feeds the K task rows of that image to the
    encoder-decoder (image features repeated per task); rows of one task run together (little
    padding) and the LM head runs only at label positions.
  * Dense region tags (`tag_weight`): a linear head on the image tokens V predicts, for every grid
    cell, the attribute and the noun of the region whose box centre falls in it ("red" + "circle",
    "word" + "farm"; two softmaxes with a background class), regresses that region's box, and
    predicts every label word on the global token - all read from the same `<DENSE_REGION_CAPTION>`
    targets. Trained from scratch on a few thousand images, a seq2seq decoder first learns the text
    prior and ignores the image; with Adam the vision tower then drifts to image-independent
    features and grounding never starts (measured: shuffling the images did not change the loss
    after 200 steps, and a linear probe could not read an object's colour from the features). The
    tag loss gives DaViT a direct, dense signal from the first step - the role that Florence-2's own
    DaViT pretraining and its region-level FLD-5B annotations play at full scale. Measured on the
    recipe's test images (`fvl train recipe`): colour/"word" per object cell 0.96-0.97, shape 0.6-0.75.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.loading import save_model
from model.presets import FLORENCE2_TASK_PROMPTS
from model.processing import IGNORE_INDEX, DecodedImageCache
from model.training.checkpoints import LoopHooks, finish_stage, load_weights_into
from model.training.config import TrainConfig
from model.training.florence2_tags import DenseTargets, TagVocab, dense_tags, tag_loss, tag_vocabulary
from model.training.loop import StageData, run_loop
from model.training.metrics import parse_regions_lenient
from model.vision import set_activation_checkpointing
from workbench.data.dataset import load_florence2_tasks

# Caption, OCR and region tasks: the tasks behind Florence-VL's three prompts.
DEFAULT_TASKS: tuple[str, ...] = ("<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>")
REGION_TASK = "<DENSE_REGION_CAPTION>"
FLORENCE2_DIR = "florence2"
TAG_HEAD_FILE = "tag_head.safetensors"


def build_florence2(model, seed: int | None = 0):
    """A random-init native Florence-2 (decoder included) with the sizes of `model`'s extractor."""
    from transformers import Florence2ForConditionalGeneration

    if model.config.encoder_type != "florence2":
        raise ValueError(f"Florence-2 pretraining needs encoder_type='florence2', this model has "
                         f"{model.config.encoder_type!r}")
    if seed is not None:
        torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(model.config.vision_config)


def transfer_to_florence_vl(florence2, model) -> None:
    """Copy the pretrained vision tower, projector and BART encoder into the Florence-VL extractor."""
    from model.vision import florence2_state_dict_to_extractor

    state = florence2_state_dict_to_extractor(florence2.state_dict())
    model.vision_tower.load_state_dict(state, strict=True)


def task_prompt_ids(tokenizer, task: str) -> list[int]:
    text = FLORENCE2_TASK_PROMPTS.get(task)
    if text is None:
        raise ValueError(f"unknown Florence-2 task {task!r}; known: {', '.join(FLORENCE2_TASK_PROMPTS)}")
    return tokenizer(text, add_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
@dataclass
class Florence2Sample:
    image: str
    tasks: list[str]
    targets: list[list[int]]  # target token ids per task (<s> ... </s>)
    regions: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)  # bins 0..999


def load_florence2_samples(data_dir: str | Path, tokenizer, split: str = "train",
                           tasks: Sequence[str] = DEFAULT_TASKS, max_target_length: int = 256,
                           split_tasks: bool = False) -> list[Florence2Sample]:
    """One sample per image holding all of its task targets (and its regions, for dense tags);
    with `split_tasks`, one sample per (image, task): a step then decodes one task per image, which
    spends the CPU on more images (the vision tower is what must learn) instead of more tasks."""
    wanted = list(dict.fromkeys(list(tasks) + [REGION_TASK]))
    rows = load_florence2_tasks(data_dir, split=split, tasks=wanted)
    by_image: dict[str, Florence2Sample] = {}
    for r in rows:
        s = by_image.setdefault(r["image"], Florence2Sample(r["image"], [], []))
        if r["task"] == REGION_TASK:
            s.regions = parse_regions_lenient(r["target"])
        if r["task"] in tasks:
            s.tasks.append(r["task"])
            s.targets.append(tokenizer(r["target"], add_special_tokens=True)["input_ids"][:max_target_length])
    samples = [s for s in by_image.values() if s.tasks]
    if split_tasks:
        samples = [Florence2Sample(s.image, [t], [y], s.regions) for s in samples for t, y in zip(s.tasks, s.targets)]
    if not samples:
        raise ValueError(f"{data_dir} has no Florence-2 task rows for split {split!r} and tasks {list(tasks)}; "
                         "make the data with `fvl data synth --kind scenes`")
    return samples


# ---------------------------------------------------------------------------------------------
# The task module
# ---------------------------------------------------------------------------------------------
class Florence2Task(nn.Module):
    """Summed seq2seq token loss of a native Florence-2 over (image, task) rows, one DaViT pass per image,
    plus (with a tag head) the dense region-tag loss on the image tokens."""

    def __init__(self, florence2, tag_head: nn.Module | None = None, tag_weight: float = 0.0,
                 tag_scale: float = 1.0, tag_vocab: TagVocab | None = None, tag_object_weight: float = 5.0,
                 global_token: bool = True, per_sequence: bool = False):
        super().__init__()
        self.per_sequence = per_sequence  # each (image, task) row's mean token loss, not its token sum
        self.florence2 = florence2
        self.tag_head = tag_head
        self.tag_weight = tag_weight
        self.tag_scale = tag_scale  # label tokens per sample, so the tag term is a per-sample mean after normalising
        self.tag_vocab = tag_vocab
        self.tag_object_weight = tag_object_weight
        self.global_token = global_token

    def encoder_inputs(self, pixel_values, row_image, prompt_ids, prompt_mask, image=None):
        f2 = self.florence2
        if image is None:
            image = f2.model.get_image_features(pixel_values).pooler_output  # (B, N, D)
        prompt = f2.get_input_embeddings()(prompt_ids).to(image.dtype)  # (R, L, D)
        embeds = torch.cat([image[row_image], prompt], dim=1)
        mask = torch.cat([torch.ones(prompt_mask.shape[0], image.shape[1], dtype=prompt_mask.dtype,
                                     device=prompt_mask.device), prompt_mask], dim=1)
        return embeds, mask

    def forward(self, pixel_values, row_image, prompt_ids, prompt_mask, labels, row_task=None,
                tag_cells=None, tag_boxes=None, tag_global=None) -> torch.Tensor:
        """Rows of one task share a prompt and have similar target lengths, so they run through the
        encoder-decoder together; the LM head runs only where a label is."""
        from transformers.models.florence2.modeling_florence2 import shift_tokens_right

        f2 = self.florence2
        image = f2.model.get_image_features(pixel_values).pooler_output  # (B, N, D): DaViT once per image
        tcfg = f2.config.text_config
        groups = [torch.arange(len(row_image), device=row_image.device)] if row_task is None else \
            [torch.nonzero(row_task == t).flatten() for t in torch.unique(row_task).tolist()]
        total = image.new_zeros((), dtype=torch.float32)
        for rows in groups:
            p_mask = prompt_mask[rows]
            width = int(p_mask.sum(1).max())
            lab = labels[rows]
            lab = lab[:, :int((lab != IGNORE_INDEX).sum(1).max())]
            embeds, mask = self.encoder_inputs(None, row_image[rows], prompt_ids[rows, :width], p_mask[:, :width],
                                               image=image)
            dec_in = shift_tokens_right(lab, tcfg.pad_token_id, tcfg.decoder_start_token_id)
            hidden = f2.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_in,
                              use_cache=False).last_hidden_state
            keep = lab != IGNORE_INDEX
            logits = f2.lm_head(hidden[keep])
            if self.per_sequence:
                token_loss = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
                token_loss[keep] = F.cross_entropy(logits.float(), lab[keep], reduction="none")
                total = total + (token_loss.sum(1) / keep.sum(1).clamp_min(1)).sum()
            else:
                total = total + F.cross_entropy(logits.float(), lab[keep], reduction="sum")
        if self.tag_head is not None and tag_cells is not None and self.tag_weight > 0:
            per_image = tag_loss(self.tag_head(image).float(), tag_cells, tag_boxes, tag_global, self.tag_vocab,
                                 self.tag_object_weight, self.global_token)
            total = total + self.tag_weight * self.tag_scale * per_image.sum()
        return total


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def florence2_stage_data(samples: Sequence[Florence2Sample], processor, tag_vocab: TagVocab | None = None,
                         grid: int | None = None, global_token: bool = True, per_sequence: bool = False) -> StageData:
    """Batches of (image, task) rows; a sample counts its label tokens, or its rows with `per_sequence` (the
    loss is then normalised by rows, matching `Florence2Task(per_sequence=True)`)."""
    tok = processor.florence2_tokenizer
    prompts = {t: task_prompt_ids(tok, t) for s in samples for t in s.tasks}
    task_index = {t: k for k, t in enumerate(sorted(prompts))}
    counts = [len(s.targets) if per_sequence else sum(len(t) for t in s.targets) for s in samples]
    pixels = DecodedImageCache()  # every image is visited once per task and epoch: decode it once

    @functools.lru_cache(maxsize=None)
    def tags_of(i: int) -> DenseTargets:  # a sample's dense targets never change: build them once
        return dense_tags(samples[i].regions, tag_vocab, grid, global_token)

    def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
        chosen = [samples[i] for i in idx]
        row_image, row_task, prompt_rows, target_rows = [], [], [], []
        for b, s in enumerate(chosen):
            for task, target in zip(s.tasks, s.targets):
                row_image.append(b)
                row_task.append(task_index[task])
                prompt_rows.append(prompts[task])
                target_rows.append(target)
        prompt_ids, prompt_mask = pad_rows(prompt_rows, tok.pad_token_id)
        labels, _ = pad_rows(target_rows, IGNORE_INDEX)
        batch = {"pixel_values": processor.images([s.image for s in chosen], cache=pixels),
                 "row_image": torch.tensor(row_image, dtype=torch.long), "prompt_ids": prompt_ids,
                 "prompt_mask": prompt_mask, "labels": labels, "row_task": torch.tensor(row_task, dtype=torch.long)}
        if tag_vocab is not None and grid:
            targets = [tags_of(i) for i in idx]
            batch["tag_cells"] = torch.stack([t.cells for t in targets])
            batch["tag_boxes"] = torch.stack([t.boxes for t in targets])
            batch["tag_global"] = torch.stack([t.multi_hot for t in targets])
        return batch

    return StageData(len(samples), make_batch, counts.__getitem__, f"{len(samples)} images")


def enable_vision_checkpointing(florence2) -> None:
    """Gradient checkpointing for the DaViT blocks and the BART encoder/decoder of a native Florence-2."""
    for stage in florence2.model.vision_tower.blocks:
        for block in stage:
            if hasattr(block, "_plain_forward"):
                continue
            block._plain_forward = block.forward

            def forward(hidden_states, _f=block._plain_forward):
                if torch.is_grad_enabled() and hidden_states.requires_grad:
                    return checkpoint(_f, hidden_states, use_reentrant=False)
                return _f(hidden_states)

            block.forward = forward
    set_activation_checkpointing(florence2.model.language_model, True)


def save_florence2(florence2, processor, path: str | Path) -> Path:
    """A native Florence-2 directory: config.json, model.safetensors and the Florence-2 tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    florence2.save_pretrained(path, safe_serialization=True)
    processor.florence2_tokenizer.save_pretrained(path)
    (path / "florence2_image_size.json").write_text(json.dumps({"image_size": processor.image_size}))
    return path


def load_florence2(path: str | Path):
    """(Florence2ForConditionalGeneration, tokenizer) from a directory written by `save_florence2`."""
    from transformers import AutoTokenizer, Florence2ForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Florence-2 directory (no config.json); pass OUT/model/florence2 "
                                "written by `fvl train florence2`")
    model = Florence2ForConditionalGeneration.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def train_florence2(model, processor, data_dir: str | Path, config: TrainConfig, *,
                    tasks: Sequence[str] = DEFAULT_TASKS, tag_weight: float = 1.0, split_tasks: bool = False,
                    loss_per: str = "token", florence2=None) -> tuple[Any, list[dict[str, Any]]]:
    """Pretrain a native Florence-2 on the data's caption/OCR/region tasks, then copy it into `model`.

    `tag_weight` weighs the dense region-tag loss (0 turns it off: pure seq2seq); `split_tasks` makes
    each sample one (image, task) pair (see `load_florence2_samples`). `loss_per` "token" averages the
    seq2seq loss over label tokens (Florence-2's objective); "sequence" averages each (image, task) row over
    its own tokens first, so a three-token OCR target weighs as much as a sixty-token caption - on small
    budgets the token average leaves reading a few percent of the gradient. Writes
    OUT/checkpoint-*/ (native Florence-2 + tag head, resumable) and OUT/model/ (the Florence-VL model
    whose extractor now holds the pretrained weights, with the native Florence-2 in
    OUT/model/florence2/, written in one atomic step so a finished stage always has both).
    Returns (florence2, history)."""
    from safetensors.torch import load_file, save_file

    cfg = config
    florence2 = florence2 if florence2 is not None else build_florence2(model, seed=cfg.seed)
    samples = load_florence2_samples(data_dir, processor.florence2_tokenizer, "train", tasks, split_tasks=split_tasks)
    florence2.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_vision_checkpointing(florence2)
    vocab = tag_vocabulary(samples) if tag_weight > 0 else None
    head = None
    if vocab is not None:
        torch.manual_seed(cfg.seed + 1)
        head = nn.Linear(florence2.config.text_config.d_model, vocab.size)
    grid = model.config.grid_size(processor.image_size)
    global_token = True  # the native Florence-2 projector always puts the pooled image token first
    if loss_per not in ("token", "sequence"):
        raise ValueError(f"loss_per {loss_per!r}: choose 'token' (Florence-2's token average) or 'sequence'")
    per_sequence = loss_per == "sequence"
    data = florence2_stage_data(samples, processor, vocab, grid, global_token, per_sequence=per_sequence)
    scale = sum(data.label_count(i) for i in range(len(samples))) / len(samples)
    task = Florence2Task(florence2, head, tag_weight, scale, vocab, global_token=global_token,
                         per_sequence=per_sequence)

    def save(d: Path) -> None:
        save_florence2(florence2, processor, d)
        if head is not None:
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(d / TAG_HEAD_FILE),
                      metadata={"tags": json.dumps(vocab.to_dict())})

    def load(d: Path) -> None:
        load_weights_into(florence2, d / "model.safetensors")
        if head is not None:
            head.load_state_dict(load_file(str(d / TAG_HEAD_FILE)))

    torch.manual_seed(cfg.seed)
    history = run_loop(task, data, cfg,
                       LoopHooks(save, load),
                       is_vision_param=lambda n: ".vision_tower." in n or ".multi_modal_projector." in n)
    florence2.eval()
    transfer_to_florence_vl(florence2, model)
    if cfg.out_dir:
        def save_both(d: Path) -> None:
            save_model(model, processor, d)
            save(d / FLORENCE2_DIR)

        finish_stage(cfg, history, save_both)
    return florence2, history
