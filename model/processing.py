"""Image + text processing that works offline.

* Images: bicubic resize to the model's square size (optionally padded to a square with the mean colour
  first, as Florence-VL's SFT stage does), scaled to [0, 1], normalised with ImageNet mean/std.
* Florence-2 side tokenizer: BART-style byte-level BPE with `<loc_0>`..`<loc_999>` and task tokens.
* LLM side tokenizer: a byte-level BPE built in process for the small presets, or loaded from a local
  directory for real ones (Phi-3.5, Llama-3.1, SmolLM2).
* Conversation templates `plain`, `phi3`, `llama3` with label masks (loss only on answer tokens).

Two token conventions (`FlorenceVLProcessor.convention`, saved in processor_config.json; docs/loading.md):
* "project" - this project's own models: BOS before every non-llama3 prompt whenever the tokenizer has one,
  an EOS after a `plain` answer (so a captioner learns to stop), square padding with round(255 * mean).
* "official" - converted Florence-VL checkpoints, which must see what they were trained on (LLaVA's
  `tokenizer_image_token` and `conversation.py`): BOS only where the tokenizer itself adds one (so Llama-3 gets
  the tokenizer's BOS in front of the template's literal `<|begin_of_text|>`), no EOS after a `plain` answer,
  Phi-3 turns joined as `<|end|>` + `\n<|user|>\n`, and LLaVA's square-pad colour int(255 * mean).

The `<image>` placeholder is expanded by the processor into N image-token ids (N = image tokens the
fusion produces), so the model replaces them one-to-one with projected features (`masked_scatter`).
"""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOC_TOKENS = [f"<loc_{i}>" for i in range(1000)]
FLORENCE2_TASK_TOKENS = ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>", "<OCR_WITH_REGION>",
                         "<OD>", "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<od>", "</od>", "<ocr>", "</ocr>"]
TEMPLATE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|begin_of_text|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLM_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]  # ids 0..4 in the in-process tokenizer
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as Florence-2 (bos 0, pad 1, eos 2)

SYSTEM_PHI3 = "You are a helpful AI assistant."
SYSTEM_LLAMA3 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

# A small built-in corpus so in-process tokenizers are identical on every machine: common English,
# the synthetic-scene vocabulary, numbers, the Florence-2 prompts and the templates.
_CORPUS_WORDS = """
the a an of in on at to and or is are was were be been there here this that these those what which who how many
much where when why image picture photo shows shown describe detail detailed text written word words read reading
object objects shape shapes color colour colors left right top bottom middle center centre above below near next
upper lower corner side one two three four five six seven eight nine ten zero yes no not any some all each every
red green blue yellow orange purple pink brown black white gray grey cyan magenta teal navy olive lime
circle circles square squares triangle triangles star stars diamond diamonds rectangle rectangles cross crosses
hexagon hexagons ellipse ellipses heart hearts small large big tiny medium
cat dog sun moon tree house car bird fish book door hat cup pen box key ship star rain snow wind fire
water stone apple bread milk tea coffee cake rice bean corn lamp desk chair table bed sofa road hill
river lake sea sky cloud leaf rose king queen city town park shop bank art map game song film time day
night week year home work play stop open close push pull go come run walk jump fly swim sing dance
locate describe with their descriptions what does the image describe paragraph category name region proposals
assistant user system helpful answer question answers questions curious intelligence artificial chat polite
""".split()


def default_corpus() -> list[str]:
    from model.presets import DEFAULT_PROMPTS, FLORENCE2_TASK_PROMPTS

    rng = np.random.default_rng(0)
    words = _CORPUS_WORDS
    lines = list(DEFAULT_PROMPTS.values()) + list(FLORENCE2_TASK_PROMPTS.values()) + [SYSTEM_PHI3, SYSTEM_LLAMA3]
    for _ in range(4000):
        n = int(rng.integers(3, 12))
        sent = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        lines.append(sent.capitalize() + rng.choice([".", "?", "", "."]))
    lines += [" ".join(str(i) for i in range(100))] * 5
    lines += [w.upper() for w in words] + [w.capitalize() for w in words]
    return lines


def _train_bpe(corpus: Iterable[str], vocab_size: int, specials: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus), trainer)
    return bpe


@functools.lru_cache(maxsize=4)
def _default_llm_tokenizer(vocab_size: int):
    return build_llm_tokenizer(None, vocab_size, _cache=False)


@functools.lru_cache(maxsize=4)
def _default_florence2_tokenizer(vocab_size: int):
    return build_florence2_tokenizer(None, vocab_size, _cache=False)


def build_llm_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000, _cache: bool = True):
    """In-process byte-level BPE for the small presets: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4."""
    from transformers import PreTrainedTokenizerFast

    if corpus is None and _cache:
        return copy.deepcopy(_default_llm_tokenizer(vocab_size))
    bpe = _train_bpe(corpus or default_corpus(), vocab_size, LLM_SPECIALS + TEMPLATE_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN})
    return tok


def build_florence2_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1000, _cache: bool = True):
    """In-process BART-style tokenizer: <s>=0 <pad>=1 </s>=2, then BPE, <loc_0..999>, task tokens, <image>."""
    from transformers import BartTokenizer

    if corpus is None and _cache:
        return copy.deepcopy(_default_florence2_tokenizer(vocab_size))
    bpe = _train_bpe(corpus or default_corpus(), vocab_size, BART_SPECIALS)
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in
              json.loads(bpe.to_str())["model"]["merges"]]
    tok = BartTokenizer(vocab=bpe.get_vocab(), merges=merges, extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.add_tokens(LOC_TOKENS + FLORENCE2_TASK_TOKENS)
    return tok


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
CONVENTIONS = ("project", "official")


def square_fill(convention: str = "project") -> tuple[int, int, int]:
    """The padding colour of `expand_to_square`: LLaVA's tuple(int(x * 255) for x in image_mean) for converted
    official checkpoints, round(255 * mean) for this project's models (one unit brighter in R and B)."""
    if convention == "official":
        return tuple(int(x * 255) for x in IMAGENET_MEAN)
    return tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


def expand_to_square(img: Image.Image, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Pad to a square with the ImageNet mean colour, image centred (LLaVA's expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    fill = fill or square_fill("project")
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class DecodedImageCache:
    """Decoded, resized images (uint8, exactly what the float conversion starts from) by file path.

    Why: a training stage visits every image many times (three Florence-2 tasks per image, several
    epochs) and decoding + resizing a PNG costs about as much as a small model's step on a GPU. The
    cache holds size*size*3 bytes per image (110 KB at 192 px) up to `max_bytes`; past that, images
    are decoded each time as before. Pixels are bit-identical with or without it."""

    def __init__(self, max_bytes: int = 2 * 2 ** 30):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._arrays: dict[tuple[str, int, bool], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._arrays)

    def get(self, key: tuple[str, int, bool]) -> np.ndarray | None:
        return self._arrays.get(key)

    def put(self, key: tuple[str, int, bool], array: np.ndarray) -> None:
        if self.nbytes + array.nbytes <= self.max_bytes:
            self._arrays[key] = array
            self.nbytes += array.nbytes


def _resized_uint8(src, size: int, pad_to_square: bool, fill: tuple[int, int, int] | None = None) -> np.ndarray:
    from workbench.data.images import load_image

    img = load_image(src)
    if pad_to_square:
        img = expand_to_square(img, fill)
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def preprocess_images(images: Sequence, size: int, pad_to_square: bool = False,
                      cache: DecodedImageCache | None = None, fill: tuple[int, int, int] | None = None) -> torch.Tensor:
    """PIL images / paths -> normalised float tensor (B, 3, size, size); paths go through `cache` if given."""
    arrays = []
    for src in images:
        key = (str(src), size, pad_to_square) if cache is not None and isinstance(src, (str, Path)) else None
        if key is not None and pad_to_square and fill is not None:
            key = (*key, tuple(fill))
        array = cache.get(key) if key is not None else None
        if array is None:
            array = _resized_uint8(src, size, pad_to_square, fill)
            if key is not None:
                cache.put(key, array)
        arrays.append(array)
    # reorder the uint8 pixels (4x less to move than floats), then in place per element the same float32
    # operations (u / 255 - mean) / std as always: bit-identical values, fewer and faster passes
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(torch.float32)
    x.div_(255.0).sub_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    return x


# ---------------------------------------------------------------------------------------------
# Conversation templates
# ---------------------------------------------------------------------------------------------
@dataclass
class Segment:
    text: str
    train: bool  # True: the loss covers these tokens (answers)


def template_segments(template: str, turns: Sequence[tuple[str, str | None]], eos: str,
                      convention: str = "project") -> list[Segment]:
    """Split a conversation into segments; only assistant answers are trained.

    `turns` is [(question, answer), ...]; the last answer may be None (a generation prompt ending with
    the assistant header). The `<image>` placeholder goes at the start of the first user turn.
    `convention` "official" writes the text exactly as Florence-VL's `conversation.py` does (module docstring).
    """
    segs: list[Segment] = []
    official = convention == "official"
    if template == "plain":
        # LLaVA pretraining: the human turn is dropped; <image> then the caption, "\n" as separator.
        answer = turns[0][1]
        segs.append(Segment(IMAGE_TOKEN, False))
        if answer is not None:
            segs.append(Segment(answer + "\n" + ("" if official else eos), True))
        return segs
    if template == "phi3" and official:
        return _official_phi3_segments(turns)
    for i, (q, a) in enumerate(turns):
        q = q.replace(IMAGE_TOKEN, "").strip()
        if i == 0:
            q = IMAGE_TOKEN + "\n" + q
        if template == "phi3":
            head = (f"<|system|>\n{SYSTEM_PHI3}<|end|>\n" if i == 0 else "") + f"<|user|>\n{q}<|end|>\n<|assistant|>\n"
            tail = "<|end|>\n"
        elif template == "llama3":
            head = ((f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_LLAMA3}<|eot_id|>"
                     if i == 0 else "")
                    + f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                    + "<|start_header_id|>assistant<|end_header_id|>\n\n")
            tail = "<|eot_id|>"
        else:
            raise ValueError(f"unknown template {template!r}; choose plain, phi3 or llama3")
        segs.append(Segment(head, False))
        if a is not None:
            segs.append(Segment(a + tail, True))
    return segs


def _official_phi3_segments(turns: Sequence[tuple[str, str | None]]) -> list[Segment]:
    """Phi-3 as LLaVA's MPT-style `get_prompt` joins it: system + "<|end|>", then per turn
    "\n<|user|>\n" + question + "<|end|>" + "\n<|assistant|>\n" + answer + "<|end|>"."""
    segs = []
    for i, (q, a) in enumerate(turns):
        q = q.replace(IMAGE_TOKEN, "").strip()
        if i == 0:
            q = IMAGE_TOKEN + "\n" + q
        head = (f"<|system|>\n{SYSTEM_PHI3}<|end|>" if i == 0 else "") + f"\n<|user|>\n{q}<|end|>\n<|assistant|>\n"
        segs.append(Segment(head, False))
        if a is not None:
            segs.append(Segment(a + "<|end|>", True))
    return segs


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position ids of one packed sequence (segments (T,), 0 = shared prefix, k = turn k): the
    prefix counts 0..L-1 and every turn restarts at L, where its lone question would start."""
    prefix = int((segments == 0).sum())
    pos = torch.arange(segments.shape[0])
    for k in torch.unique(segments[segments > 0]).tolist():
        where = torch.nonzero(segments == k).squeeze(1)
        pos[where] = prefix + torch.arange(where.numel())
    return pos


def packed_attention_mask(segments: torch.Tensor, implementation: str = "sdpa",
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-D attention mask (B, 1, T, T) for packed independent turns: causal, and a token sees the
    shared prefix (segment 0) and its own turn only. Padding (segment -1) sees the prefix, so no
    row is empty (an all-masked row would give NaN). Boolean (True = attend) for SDPA and flex
    attention, additive float (0 / most negative) for eager; flash-attention takes no custom masks."""
    if implementation.startswith("flash"):
        raise ValueError("packed independent turns need a custom attention mask, which flash-attention does not "
                         "take; train with attn_implementation='sdpa' or without independent_turns")
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed = allowed.unsqueeze(1)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def stop_strings(template: str) -> list[str]:
    return {"plain": ["\n"], "phi3": ["<|end|>"], "llama3": ["<|eot_id|>"]}[template]


class FlorenceVLProcessor:
    """Turns (images, conversations) into model inputs; saves and loads with the model."""

    def __init__(self, llm_tokenizer, florence2_tokenizer, image_size: int, num_image_tokens: int,
                 template: str = "plain", pad_to_square: bool = False, max_length: int = 2048,
                 convention: str = "project"):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
        self.convention = convention
        self.llm_tokenizer = llm_tokenizer
        self.florence2_tokenizer = florence2_tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.template = template
        self.pad_to_square = pad_to_square
        self.max_length = max_length
        self.image_token_id = llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == llm_tokenizer.unk_token_id:
            raise ValueError("the LLM tokenizer has no <image> token; add it with tokenizer.add_tokens(['<image>'])")

    # -- images ---------------------------------------------------------------------------------
    def images(self, images: Sequence, cache: DecodedImageCache | None = None) -> torch.Tensor:
        return preprocess_images(images, self.image_size, self.pad_to_square, cache, square_fill(self.convention))

    # -- Florence-2 prompts ----------------------------------------------------------------------
    def prompt_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise the Florence-2 task prompts, right-padded (left padding would move BART's positions)."""
        tok = self.florence2_tokenizer
        enc = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
        length = max(len(e) for e in enc)
        ids = torch.full((len(enc), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), length), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        return ids, mask

    # -- LLM text ------------------------------------------------------------------------------
    def _encode_segments(self, segs: list[Segment], template: str) -> tuple[list[int], list[int]]:
        tok = self.llm_tokenizer
        ids: list[int] = []
        labels: list[int] = []
        if self._starts_with_bos(template):
            ids.append(tok.bos_token_id)
            labels.append(IGNORE_INDEX)
        for seg in segs:
            parts = seg.text.split(IMAGE_TOKEN)
            for j, part in enumerate(parts):
                if j > 0:
                    ids += [self.image_token_id] * self.num_image_tokens
                    labels += [IGNORE_INDEX] * self.num_image_tokens
                if part:
                    piece = tok(part, add_special_tokens=False)["input_ids"]
                    ids += piece
                    labels += piece if seg.train else [IGNORE_INDEX] * len(piece)
        return ids[: self.max_length], labels[: self.max_length]

    def _starts_with_bos(self, template: str) -> bool:
        """project: BOS before every non-llama3 prompt (the llama3 text carries `<|begin_of_text|>` itself);
        official: BOS exactly when the tokenizer adds one, as LLaVA's `tokenizer_image_token` keeps it."""
        tok = self.llm_tokenizer
        if tok.bos_token_id is None:
            return False
        if self.convention == "official":
            return tok("a")["input_ids"][:1] == [tok.bos_token_id]
        return template != "llama3"

    def encode_conversation(self, turns: Sequence[tuple[str, str | None]], template: str | None = None):
        """-> (input_ids, labels) lists for one sample; labels are -100 outside the answers."""
        eos = self.llm_tokenizer.eos_token or ""
        template = template or self.template
        segs = template_segments(template, turns, eos, self.convention)
        return self._encode_segments(segs, template)

    def encode_independent_turns(self, turns: Sequence[tuple[str, str]], template: str | None = None
                                 ) -> tuple[list[int], list[int], list[int]]:
        """Pack independent (question, answer) turns about one image into ONE sequence that trains
        exactly like the separate single-turn samples, at the cost of one.

        Every single-turn encoding starts with the same prefix (system prompt, user header, image
        tokens); it is stored once, followed by each turn's remainder. Returns (input_ids, labels,
        segments): segment 0 is the shared prefix, segment k the k-th turn. `segment_positions` and
        `packed_attention_mask` turn the segments into position ids (each turn starts where its
        single-turn sample's question would) and a mask (a turn sees the prefix and itself), so
        each answer is conditioned on exactly what it would be at test time, a lone question.
        Only for turns that do not refer to each other (synthetic QA); real multi-turn chats need
        `encode_conversation`."""
        singles = [self.encode_conversation([(q, a)], template) for q, a in turns]
        if not singles:
            raise ValueError("encode_independent_turns: no turns given")
        ids0 = singles[0][0]
        if self.image_token_id not in ids0:
            raise ValueError("encode_independent_turns needs an image in the prompt (no <image> token found); "
                             "use encode_conversation for text-only samples")
        split = len(ids0) - ids0[::-1].index(self.image_token_id)  # just past the last image token
        ids, labels, segments = list(ids0[:split]), list(singles[0][1][:split]), [0] * split
        for k, (s_ids, s_labels) in enumerate(singles, start=1):
            if s_ids[:split] != ids0[:split]:
                raise ValueError(f"turn {k} does not share the prompt prefix of turn 1 (the template puts "
                                 "question text before the image?); use encode_conversation instead")
            ids += s_ids[split:]
            labels += s_labels[split:]
            segments += [k] * (len(s_ids) - split)
        return ids, labels, segments

    def collate(self, samples: Sequence[tuple[list[int], ...]], padding_side: str = "right"):
        """Pad a batch of (input_ids, labels) to the longest; returns input_ids, attention_mask, labels.
        Samples from `encode_independent_turns` (input_ids, labels, segments) also give
        `position_ids` and `segments` (-1 on padding) for `packed_attention_mask`."""
        pad = self.llm_tokenizer.pad_token_id or 0
        length = max(len(s[0]) for s in samples)
        packed = any(len(s) > 2 and s[2] is not None for s in samples)
        ids = torch.full((len(samples), length), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        if packed:
            segments = torch.full((len(samples), length), -1, dtype=torch.long)
            positions = torch.zeros((len(samples), length), dtype=torch.long)
        for i, (s_ids, s_labels, *rest) in enumerate(samples):
            n = len(s_ids)
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(s_ids)
            mask[i, sl] = 1
            labels[i, sl] = torch.tensor(s_labels)
            if packed:
                seg = torch.tensor(rest[0]) if rest and rest[0] is not None else torch.zeros(n, dtype=torch.long)
                segments[i, sl] = seg
                positions[i, sl] = segment_positions(seg)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if packed:
            out.update(position_ids=positions, segments=segments)
        return out

    def __call__(self, images: Sequence | None = None, questions: Sequence[str] | None = None,
                 answers: Sequence[str | None] | None = None, template: str | None = None,
                 padding_side: str | None = None) -> dict:
        """Batch of single-turn samples. Without answers the text ends with the assistant header
        (a generation prompt) and is left-padded; with answers, right-padded with labels."""
        n = len(images) if images is not None else len(questions)
        questions = list(questions) if questions is not None else [""] * n
        answers = list(answers) if answers is not None else [None] * n
        samples = [self.encode_conversation([(q, a)], template) for q, a in zip(questions, answers)]
        side = padding_side or ("left" if all(a is None for a in answers) else "right")
        batch = self.collate(samples, padding_side=side)
        if images is not None:
            batch["pixel_values"] = self.images(images)
        return batch

    def decode(self, ids, template: str | None = None) -> str:
        text = self.llm_tokenizer.decode(ids, skip_special_tokens=False)
        for s in stop_strings(template or self.template) + [self.llm_tokenizer.eos_token or "\0", "<pad>"]:
            if s and s in text:
                text = text.split(s)[0]
        return text.strip()

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.llm_tokenizer.save_pretrained(path / "llm_tokenizer")
        self.florence2_tokenizer.save_pretrained(path / "florence2_tokenizer")
        meta = dict(image_size=self.image_size, num_image_tokens=self.num_image_tokens, template=self.template,
                    pad_to_square=self.pad_to_square, max_length=self.max_length, convention=self.convention)
        (path / "processor_config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FlorenceVLProcessor":
        from transformers import AutoTokenizer

        path = Path(path)
        meta_file = path / "processor_config.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} holds no processor_config.json; save the processor with "
                                    "processor.save_pretrained(DIR) or pass a model directory written by fvl")
        meta = json.loads(meta_file.read_text())
        llm = AutoTokenizer.from_pretrained(path / "llm_tokenizer")
        f2 = AutoTokenizer.from_pretrained(path / "florence2_tokenizer")
        return cls(llm, f2, **meta)
