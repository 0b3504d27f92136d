"""What an attribution differentiates: a scalar per image, differentiable in the pixels.

  * `AnswerScore` - the logit of an answer's first token (or the answer's teacher-forced log-likelihood)
    under the full Florence-VL forward;
  * `ProbeScore` - a fitted linear probe's logit on a pooled tap, the tap read by
    `workbench.taps.capture(..., detach=False)` so the gradient flows back to the pixels;
  * `probe_from_store` fits that probe with the probe matrix's own solver (`probes.estimator.LinearProbe`).

`probes.attribution` runs captum on these targets; it re-exports every name here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from model.processing import IGNORE_INDEX


class AttributionError(ValueError):
    """Attribution cannot be computed as asked; the message says what to change."""


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


class AnswerScore:
    """F(image) = score of `answer` given `question` under the model's conversation template.

    score="logit":   the logit of the answer's first token at the position that predicts it;
    score="logprob": the sum of log-probabilities of all answer tokens as trained (teacher forcing,
                     including the template's end marker).
    The answer is tokenised in context (`processor.encode_conversation`), so the first token is the
    one the model really has to produce. Note the `plain` template (pretraining) ignores the question.
    """

    def __init__(self, model, processor, question: str, answer: str, score: str = "logit",
                 template: str | None = None):
        if score not in ("logit", "logprob"):
            raise AttributionError(f"score {score!r} is not 'logit' or 'logprob'")
        if not str(answer).strip():
            raise AttributionError("the answer is empty; pass the answer text whose score to attribute")
        self.model, self.processor = model, processor
        self.question, self.answer, self.score = question, answer, score
        self.template = template or processor.template
        ids, labels = processor.encode_conversation([(question, answer)], self.template)
        positions = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        if not positions:
            raise AttributionError("the answer was truncated away (prompt longer than the processor's max_length)")
        self.first = positions[0]
        if self.first == 0:
            raise AttributionError("the answer starts the sequence; nothing conditions it")
        self.answer_positions = positions
        self.answer_ids = [ids[i] for i in positions]
        keep = self.first if score == "logit" else positions[-1] + 1
        self.input_ids = torch.tensor([ids[:keep]], dtype=torch.long, device=_param(model).device)

    @property
    def token(self) -> str:
        return self.processor.llm_tokenizer.convert_ids_to_tokens(self.answer_ids[0])

    def describe(self) -> dict[str, Any]:
        return {"kind": "answer", "question": self.question, "answer": self.answer, "score": self.score,
                "template": self.template,
                "first_token": self.token, "first_token_id": int(self.answer_ids[0]),
                "answer_tokens": len(self.answer_ids)}

    def from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, N, H) projected image tokens -> (B,) scores."""
        bsz = image_features.shape[0]
        ids = self.input_ids.expand(bsz, -1)
        if self.score == "logit":
            out = self.model(input_ids=ids, image_features=image_features, logits_to_keep=1)
            return out.logits[:, -1, self.answer_ids[0]]
        logits = self.model(input_ids=ids, image_features=image_features).logits
        pos = torch.tensor(self.answer_positions, device=logits.device)
        logp = torch.log_softmax(logits[:, pos - 1].float(), dim=-1)
        tgt = torch.tensor(self.answer_ids, device=logits.device)
        return logp.gather(-1, tgt.view(1, -1, 1).expand(bsz, -1, 1)).squeeze(-1).sum(-1).to(logits.dtype)

    def from_streams(self, *streams: torch.Tensor) -> torch.Tensor:
        """Streams in `model.stream_names` order -> (B,) scores (fusion + projector + LLM only)."""
        model = self.model
        fused = model.fusion(dict(zip(model.stream_names, streams)))
        return self.from_features(model.mm_projector(fused.to(model.mm_projector.encoder_mlp[0].weight.dtype)))

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.model.get_image_features(pixel_values))


def linear_probe(coef: Any, intercept: Any = None, mean: Any = None, scale: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch function x (B, D) -> logits (B, C) from a fitted linear probe's weights
    (coef (C, D) or (D,), as scikit-learn stores them), with the probe's standardisation if any."""
    w = torch.as_tensor(np.asarray(coef, dtype=np.float64))
    w = w.view(1, -1) if w.dim() == 1 else w
    b = torch.as_tensor(np.asarray(intercept if intercept is not None else np.zeros(w.shape[0]), dtype=np.float64)).view(-1)
    mu = torch.as_tensor(np.asarray(mean, dtype=np.float64)) if mean is not None else None
    sd = torch.as_tensor(np.asarray(scale, dtype=np.float64)) if scale is not None else None

    def fn(x: torch.Tensor) -> torch.Tensor:
        if mu is not None:
            x = x - mu.to(x)
        if sd is not None:
            x = x / sd.to(x)
        return x @ w.to(x).T + b.to(x)

    return fn


def probe_from_store(store, tap: str, label: str, C: float = 1.0, device: str = "cpu"):
    """Fit a `probes.estimator.LinearProbe` (the probe matrix's solver and objective, standardisation folded
    into its weights) for `label` on a store's pooled `tap` and return it; ``probe.classes_`` are the class
    names (strings) and ``probe.torch_logits`` is what `ProbeScore` differentiates. Binary probes have one
    logit: positive means classes_[1]. Items without the label are left out."""
    from probes.estimator import LinearProbe

    if tap not in store.taps:
        raise AttributionError(f"tap {tap!r} is not in {store.path}; it has {store.taps}")
    if label not in store.label_names():
        raise AttributionError(f"label {label!r} is not in {store.path}; it has {store.label_names()}")
    x = store.load(tap, dtype="float32")
    if x.ndim != 2:
        raise AttributionError(f"tap {tap!r} is stored with pool {store.manifest.get('pool')!r}; a probe needs "
                               "mean or global pooling (recapture with --pool mean)")
    y = np.asarray(store.labels()[label], dtype=object)
    keep = np.array([v is not None and not (isinstance(v, float) and math.isnan(v)) for v in y])
    y = np.array([str(v) for v in y[keep]])
    if len(set(y)) < 2:
        raise AttributionError(f"label {label!r} has fewer than 2 classes among the stored items")
    return LinearProbe(C=C, max_iter=1000, device=device).fit(x[keep], y)


class ProbeScore:
    """F(image) = probe(pooled tap)[class_index]: attributes a probe's decision to the pixels.

    The tap is read by `workbench.taps.capture(..., detach=False)`, pooled there exactly as the store was
    pooled at capture time, and fed to `probe`: a fitted `probes.estimator.LinearProbe`, or any torch
    callable (B, D) -> (B, C) or (B,) (e.g. from `linear_probe`)."""

    def __init__(self, model, tap: str, probe, class_index: int | None = None,
                 pool: str = "mean", description: Mapping[str, Any] | None = None):
        from workbench.taps import TapError, resolve

        if tap.startswith("llm."):
            raise AttributionError(f"tap {tap!r} depends on a text prompt; probe a vision-side tap")
        try:
            if resolve(model, [tap]) != [tap]:
                raise TapError(tap)
        except TapError:
            raise AttributionError(f"tap {tap!r} is not a tap of this model (list them with `fvl taps`)") from None
        self.model, self.tap, self.class_index, self.pool = model, tap, class_index, pool
        self.probe = probe.torch_logits if hasattr(probe, "torch_logits") else probe
        self.description = dict(description or {})

    def describe(self) -> dict[str, Any]:
        return {"kind": "probe", "tap": self.tap, "pool": self.pool, "class_index": self.class_index,
                **self.description}

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.logits(pixel_values)
        if logits.dim() == 1:
            return logits
        if self.class_index is None:
            if logits.shape[-1] != 1:
                raise AttributionError(f"the probe has {logits.shape[-1]} classes; pass class_index")
            return logits[:, 0]
        return logits[:, self.class_index]

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The probe's whole output on the pooled tap, (B, C) or (B,); differentiable in the pixels."""
        from workbench.taps import capture

        with capture(self.model, [self.tap], pool=self.pool, detach=False) as cache:
            self.model.get_image_features(pixel_values)
        x = cache[self.tap]
        return self.probe(x.to(pixel_values.device) if x.device != pixel_values.device else x)
