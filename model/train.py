"""The training loop shared by every stage (Florence-2 pretraining, Florence-VL stage 1 and stage 2).

What it gives:
  * AdamW, cosine schedule with linear warmup, gradient accumulation, gradient clipping,
    bf16 autocast where the device supports it, optional gradient checkpointing, tqdm progress,
    one JSON line per optimiser step in OUT/metrics.jsonl.
  * Exact resume: every `save_every` steps OUT/checkpoint-{step}/ holds the weights (safetensors,
    loadable by `load_model`), optimizer and scheduler state, RNG states and the data position,
    written atomically (temp dir, then rename). `resume=True` continues from the latest one and
    the loss sequence equals that of an uninterrupted run on CPU.
  * Data parallel under torchrun: each optimiser step consumes one *global* batch chosen by a
    seeded permutation that every rank computes identically; rank r takes every world-th sample
    of it. The loss of a step is the sum of token losses over the global batch divided by the
    number of label tokens in the global batch, so the gradient does not depend on how the batch
    is split into ranks and micro-batches: one process and N processes give the same losses.

Stage-specific code (what a sample is, how a batch is built, what the loss is) comes from a
`StageData` (samples + batch builder + label counter) and a task module whose forward returns
the summed token loss. The Florence-VL stages are here (`train_stage`); Florence-2 pretraining
lives in `model.florence2_pretrain`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.processing import IGNORE_INDEX, DecodedImageCache, packed_attention_mask

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "model"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings of one training stage. `batch_size` is the GLOBAL batch (samples per optimiser
    step over all ranks); `micro_batch_size` is what one forward pass holds (accumulation fills
    the rest), so memory and the optimisation are chosen independently."""

    out_dir: str | None = None
    stage: str = "finetune"  # "florence2", "pretrain" or "finetune" (names the metrics rows)
    template: str | None = None  # None: "plain" for pretrain, the model's template for finetune
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 16
    micro_batch_size: int | None = None  # None: the whole per-rank share in one pass
    lr: float = 1e-3
    vision_lr: float | None = None  # learning rate of the vision side when it trains (None: lr)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: str = "auto"  # "auto" (CUDA with bf16 support), "yes", "no"
    gradient_checkpointing: bool = False
    tune_vision: bool = False
    tune_projector: bool = True
    tune_llm: bool = True
    cache_features: bool | None = None  # None: cache image features whenever the vision side is frozen
    # stage 2: seeded shuffle of each conversation's QA turns (see load_vlm_samples). Off by default: real
    # multi-turn data can refer back to earlier turns, and `fvl data synth` already writes shuffled turns.
    shuffle_turns: bool = False
    # stage 2: pack each conversation's turns as independent single-turn samples sharing the image prefix
    # (`FlorenceVLProcessor.encode_independent_turns`): every answer sees only its own question, as at
    # test time, for the cost of one sequence. Only for independent questions (synthetic QA).
    independent_turns: bool = False
    save_every: int = 0  # checkpoint every N steps (0: only the final one)
    save_total_limit: int | None = 2  # keep the newest N checkpoints
    resume: bool = False
    stop_after: int | None = None  # stop after N steps in this run (a planned interruption)
    seed: int = 42
    log_every: int = 1
    progress: bool = True
    max_length: int | None = None
    num_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FVL_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(local)
    return DistInfo(rank, dist.get_world_size(), local)


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_bf16(mode: str, device: torch.device) -> bool:
    """bf16 autocast "where supported": on by default on CUDA with bf16, off on CPU unless asked. Even
    on the development machine's Xeon, which has native bf16 (AMX), it does not pay at our sizes: a
    small-preset Florence-2 step at batch 8 takes 0.63-0.69 s under bf16 against 0.38-0.39 s in fp32
    (`fvl train florence2 --max-steps 30 --bf16 yes|no`, metrics.jsonl), a stage-2 step 1.05-1.12x
    less (`fvl bench train-step --json`, `bf16_speedup`); and exact resume is promised for fp32."""
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"bf16={mode!r}: choose auto, yes or no")
    if mode == "no":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return mode == "yes"


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Sum of cross-entropy over label tokens (labels == -100 ignored), in float32.

    Summing here and dividing by the global batch's label count later is what makes the loss
    independent of micro-batching and of the number of ranks."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_label_tokens(labels: Sequence[int], shift: bool = True) -> int:
    seq = labels[1:] if shift else labels
    return sum(1 for x in seq if x != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Stage data: samples + how to make a batch
# ---------------------------------------------------------------------------------------------
@dataclass
class StageData:
    """`n` samples; `make_batch(indices)` -> dict of tensors for the task module;
    `label_count(i)` -> label tokens of sample i (known before any forward pass)."""

    n: int
    make_batch: Callable[[list[int]], dict[str, torch.Tensor]]
    label_count: Callable[[int], int]
    describe: str = ""


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so every
    rank and every resumed run computes the same one."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)  # the incomplete last batch is dropped (every step sees a full batch)


def total_steps(n: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    return max(1, int(math.ceil(cfg.epochs * steps_per_epoch(n, cfg.batch_size))))


def global_batch(n: int, cfg: TrainConfig, step: int) -> list[int]:
    spe = steps_per_epoch(n, cfg.batch_size)
    epoch, b = divmod(step, spe)
    order = epoch_order(n, cfg.seed, epoch)
    return order[b * cfg.batch_size:(b + 1) * cfg.batch_size]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_meta"] = torch.tensor([np_state[2], np_state[3]], dtype=torch.int64)
    state["numpy_gauss"] = torch.tensor([np_state[4]], dtype=torch.float64)
    py = random.getstate()
    state["python"] = torch.tensor(py[1], dtype=torch.int64)
    state["python_meta"] = torch.tensor([py[0]] + ([py[2]] if py[2] is not None else []), dtype=torch.float64)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(meta[0]), int(meta[1]),
                         float(state["numpy_gauss"][0])))
    pm = state["python_meta"].tolist()
    random.setstate((int(pm[0]), tuple(int(x) for x in state["python"].tolist()), pm[1] if len(pm) > 1 else None))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp dirs of an interrupted write are ignored)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temp dir beside `final`, then rename it into place (a crash leaves no half checkpoint)."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _damaged(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"cannot resume from {path}: the file is missing, truncated, or not a plain tensor file "
                      f"({type(exc).__name__}; only plain tensors are ever read: torch.load(weights_only=True)). "
                      f"Delete {path.parent} to resume from an earlier checkpoint, or start again with a new --out")


def _load_tensors_file(path: Path):
    """`torch.load(weights_only=True)`, with a clear error naming the file instead of a bare UnpicklingError."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError (code in the pickle), RuntimeError (truncated zip), OSError
        raise _damaged(path, exc) from None


def load_weights_into(module: nn.Module, path: Path) -> None:
    """Load a safetensors file written by save_pretrained into `module` in place; only tied weights
    (stored once) may be missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, exc) from None
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"checkpoint {path} does not fit the model ({str(exc).strip().splitlines()[-1].strip()}); "
                         "resume with the same model and stage, or use a new --out") from None
    tied = set()
    for name in getattr(module, "all_tied_weights_keys", {}) or {}:
        tied.add(name)
    tied |= set(getattr(module, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}; resume with the same model and stage")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopHooks:
    """How a stage saves its weights (a loadable model directory) and reloads them for resume."""

    save_model_dir: Callable[[Path], None]
    load_weights: Callable[[Path], None]


def _param_groups(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, is_vision: Callable[[str], bool]):
    groups: dict[str, list[nn.Parameter]] = {"main": [], "vision": []}
    for name, p in params:
        groups["vision" if (cfg.vision_lr is not None and is_vision(name)) else "main"].append(p)
    out = [{"params": groups["main"], "lr": cfg.lr}]
    if groups["vision"]:
        out.append({"params": groups["vision"], "lr": cfg.vision_lr})
    return [g for g in out if g["params"]]


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel on CPU and CUDA: one pass over all parameters instead of a
    dozen small operations per tensor (the same update rule, up to float rounding). On the 2-core
    development machine the small Florence-2 stage's optimizer step (272 tensors, 4.1 M parameters)
    takes 5-8 ms fused against 17-29 ms unfused (three runs), saving about 5% of a training step
    (`fvl bench train-step --json`, key "optimizer", times both and their difference)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_loop(task: nn.Module, data: StageData, cfg: TrainConfig, hooks: LoopHooks, *,
             is_vision_param: Callable[[str], bool] = lambda n: False, dist_info: DistInfo | None = None,
             device: torch.device | None = None) -> list[dict[str, Any]]:
    """Train `task` (forward(**batch) -> summed token loss) over `data`; returns one row per step
    (this run's and, after a resume, the earlier ones, so the history is always complete)."""
    dist_info = dist_info or init_distributed()
    device = device or default_device()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world, rank = dist_info.world_size, dist_info.rank
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the number of processes ({world}); "
                         "every rank needs at least one sample per step")
    if data.n < 1:
        raise ValueError("the training set is empty; check the data directory and split")
    task.to(device)  # batches go to `device`; so must the weights (in place: the same Parameter objects)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    n_steps = total_steps(data.n, cfg)
    warmup = int(round(cfg.warmup_ratio * n_steps))

    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: every parameter is frozen (check tune_vision / tune_projector / tune_llm)")
    params = [p for _, p in named]
    optimizer = make_optimizer(_param_groups(named, cfg, is_vision_param), cfg, device)
    scheduler = cosine_with_warmup(optimizer, warmup, n_steps, cfg.min_lr_ratio)

    history: list[dict[str, Any]] = []
    start = 0
    if cfg.resume and out is not None and (ckpt := latest_checkpoint(out)) is not None:
        state = json.loads((ckpt / STATE_FILE).read_text())
        if state.get("total_steps") != n_steps or state.get("n_samples") != data.n:
            raise ValueError(f"checkpoint {ckpt} was written for {state.get('total_steps')} steps over "
                             f"{state.get('n_samples')} samples, this run has {n_steps} over {data.n}; resume "
                             "with the same data and schedule, or use a new --out")
        hooks.load_weights(ckpt)
        optimizer.load_state_dict(_load_tensors_file(ckpt / "optimizer.pt"))
        scheduler.load_state_dict(_load_tensors_file(ckpt / "scheduler.pt"))
        rng_file = ckpt / f"rng-rank{rank}.pt"
        if rng_file.is_file():
            _set_rng_state(_load_tensors_file(rng_file))
        start = int(state["step"])
        history = list(state.get("history", []))
    if out is not None and dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _rewrite_metrics(out / METRICS_FILE, keep_until=start)
    _barrier(dist_info)

    module: nn.Module = task
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(task, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    autocast = use_bf16(cfg.bf16, device)
    task.train()

    from tqdm.auto import tqdm

    bar = tqdm(total=n_steps, initial=start, desc=cfg.stage, unit="step",
               disable=not (cfg.progress and dist_info.is_main), dynamic_ncols=True)
    t0 = time.time()
    step = start
    try:
        while step < n_steps:
            if cfg.stop_after is not None and step - start >= cfg.stop_after:
                break
            batch_idx = global_batch(data.n, cfg, step)
            n_tok = sum(data.label_count(i) for i in batch_idx)
            local = batch_idx[rank::world]
            mbs = cfg.micro_batch_size or len(local)
            micro = [local[i:i + mbs] for i in range(0, len(local), mbs)]
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for j, mb in enumerate(micro):
                sync = j == len(micro) - 1
                ctx = module.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                             for k, v in data.make_batch(mb).items()}
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        s = module(**batch)
                    (s * (world / max(1, n_tok))).backward()
                loss_sum += s.detach().double().cpu()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(loss_sum)
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            row = {"stage": cfg.stage, "step": step, "epoch": round(step / steps_per_epoch(data.n, cfg.batch_size), 4),
                   "loss": float(loss_sum) / max(1, n_tok), "lr": lr_now, "grad_norm": grad_norm, "tokens": n_tok,
                   "elapsed_s": round(time.time() - t0, 3)}
            history.append(row)
            if dist_info.is_main:
                if out is not None and (step % max(1, cfg.log_every) == 0 or step == n_steps):
                    with open(out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr_now:.2e}")
                bar.update()
            if out is not None and cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                _save_checkpoint(out, step, n_steps, data.n, cfg, history, optimizer, scheduler, hooks, dist_info)
    finally:
        bar.close()
    if out is not None and step > start and (step == n_steps or cfg.stop_after is not None):
        # The final step (or a planned stop) always leaves a checkpoint to resume from or to load.
        if not (out / f"{CHECKPOINT_PREFIX}{step}" / STATE_FILE).is_file():
            _save_checkpoint(out, step, n_steps, data.n, cfg, history, optimizer, scheduler, hooks, dist_info)
    return history


def _rewrite_metrics(path: Path, keep_until: int) -> None:
    """After a resume, drop metric rows past the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= keep_until:
                rows.append(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write: it is written again
            continue
    path.write_text("".join(r + "\n" for r in rows))


def _save_checkpoint(out: Path, step: int, n_steps: int, n_samples: int, cfg: TrainConfig, history: list,
                     optimizer, scheduler, hooks: LoopHooks, dist_info: DistInfo) -> None:
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    if dist_info.is_main:
        def write(tmp: Path) -> None:
            hooks.save_model_dir(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": step, "total_steps": n_steps, "n_samples": n_samples, "world_size": dist_info.world_size,
                     "samples_seen": step * cfg.batch_size, "finished": step >= n_steps, "config": cfg.to_dict(),
                     "history": history}
            torch.save(_rng_state(), tmp / "rng-rank0.pt")
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))

        _atomic_dir(final, write)
    _barrier(dist_info)
    if not dist_info.is_main:  # every rank keeps its own RNG state (dropout masks differ per rank)
        torch.save(_rng_state(), final / f"rng-rank{dist_info.rank}.pt")
    _barrier(dist_info)
    if dist_info.is_main and cfg.save_total_limit:
        for old in list_checkpoints(out)[:-cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def stage_finished(out_dir: str | Path) -> bool:
    """True when OUT holds the final model of a completed stage (the recipe skips such stages)."""
    final = Path(out_dir) / FINAL_DIR
    return (final / "config.json").is_file() and (final / STATE_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Florence-VL stages (stage 1 "pretrain", stage 2 "finetune")
# ---------------------------------------------------------------------------------------------
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

    from workbench.data.llava import read_llava

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
            px = self.processor.images(todo[i:i + self.batch_size])
            px = px.to(next(self.model.parameters()).device)
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
        from model.builder import save_model

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
    template = cfg.template or ("plain" if cfg.stage == "pretrain" else
                                (model.config.template if model.config.template != "plain" else "phi3"))
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


def finish_stage(cfg: TrainConfig, history: list[dict[str, Any]], save: Callable[[Path], None]) -> Path | None:
    """Write OUT/model (the stage's final weights + trainer_state.json) when the schedule is complete."""
    if not cfg.out_dir:
        return None
    out = Path(cfg.out_dir)
    dist_info = init_distributed()
    ckpt = latest_checkpoint(out)
    if not history or ckpt is None:
        return None
    state = json.loads((ckpt / STATE_FILE).read_text())
    if not state.get("finished"):
        return None
    if dist_info.is_main:
        def write(tmp: Path) -> None:
            save(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "history": history}, indent=1))

        _atomic_dir(out / FINAL_DIR, write)
    _barrier(dist_info)
    return out / FINAL_DIR
