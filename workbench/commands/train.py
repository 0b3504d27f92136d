"""`fvl train`: Florence-2 pretraining, Florence-VL stage 1 / stage 2, and the whole recipe.

    fvl train florence2 --preset small --data DATA --out runs/f2            # multi-task seq2seq Florence-2
    fvl train pretrain  --model runs/f2/model --data DATA --out runs/s1     # stage 1: captions, plain template
    fvl train finetune  --model runs/s1/model --data DATA --out runs/s2     # stage 2: instructions, chat template
    fvl train recipe    --preset small --out runs/recipe --json             # data + the three stages + eval

DATA is a `fvl data synth` directory (pretrain.json, instruct.json, florence2_tasks.json); for stage 1/2
a LLaVA .json file works too. Every stage writes OUT/metrics.jsonl, OUT/checkpoint-{step}/ every
--save-every steps and OUT/model/ at the end; `--resume` continues from the latest checkpoint with the
same loss sequence as an uninterrupted run. Under `torchrun --nproc_per_node=N` the stages run data
parallel (gloo on CPU, nccl on GPUs) with the same losses as one process with the same --batch-size.
`--engine accelerate` runs the same loop on `accelerate` (launch it with `accelerate launch` or torchrun
for data parallel runs); its checkpoints resume only with the same engine.
"""
from __future__ import annotations

import argparse


def _add_loop_args(p: argparse.ArgumentParser, *, epochs: float, batch_size: int, lr: float) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, model/)")
    g.add_argument("--epochs", type=float, default=epochs, help=f"passes over the data (default {epochs})")
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"GLOBAL batch: samples per optimiser step over all processes (default {batch_size})")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples per forward pass; gradient accumulation fills the global batch (default: all)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup share of the steps (default 0.03)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default 1)")
    g.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                   help="bf16 autocast: auto = on CUDA with bf16 support, off on CPU (default auto)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps, 0 = only at the end (default 50)")
    g.add_argument("--save-total-limit", type=int, default=2, help="keep the newest N checkpoints (default 2)")
    g.add_argument("--resume", action="store_true", help="continue from the latest OUT/checkpoint-*")
    g.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this run (resume later)")
    g.add_argument("--seed", type=int, default=42, help="seed of the data order and initialisation (default 42)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--engine", choices=("native", "accelerate"), default="native",
                   help="native: this loop (DDP under torchrun); accelerate: the same loop on accelerate's "
                        "Accelerator, for `accelerate launch` (default native)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("train", help="train Florence-2, Florence-VL stage 1/2, or the whole recipe",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = p.add_subparsers(dest="train_command", metavar="STAGE")
    from workbench.commands._common import add_model_args

    f = tsub.add_parser("florence2", help="Florence-2-style multi-task seq2seq pretraining (caption, OCR, regions)")
    add_model_args(f, default_preset="small")
    f.add_argument("--data", required=True, help="a `fvl data synth` directory")
    f.add_argument("--image-size", type=int, default=None, help="input side for a --preset model (default: preset's)")
    f.add_argument("--tasks", default="<DETAILED_CAPTION>,<OCR>,<DENSE_REGION_CAPTION>",
                   help="comma-separated Florence-2 tasks (default: the three Florence-VL prompts' tasks)")
    f.add_argument("--split-tasks", action="store_true",
                   help="one (image, task) pair per sample instead of every task of an image in one sample")
    f.add_argument("--loss-per", choices=("token", "sequence"), default="token",
                   help="average the seq2seq loss over label tokens (Florence-2's objective, default) or over "
                        "(image, task) rows, so short OCR targets weigh as much as long captions")
    _add_loop_args(f, epochs=2.0, batch_size=16, lr=1e-3)
    f.set_defaults(func=run_florence2, resumable=True)

    for stage, helptext, epochs in (
            ("pretrain", "stage 1: caption alignment with the plain template (projector + LLM, --tune-vision too)", 1.0),
            ("finetune", "stage 2: instruction tuning with the chat template (projector + LLM)", 3.0)):
        s = tsub.add_parser(stage, help=helptext)
        add_model_args(s, default_preset="small")
        s.add_argument("--data", required=True,
                       help="a `fvl data synth` directory or a LLaVA .json file (images relative to it)")
        s.add_argument("--image-folder", default=None, help="folder a LLaVA file's image paths are relative to")
        s.add_argument("--template", choices=("plain", "phi3", "llama3"), default=None,
                       help="conversation template (default: plain for pretrain, the model's chat template for finetune)")
        if stage == "pretrain":
            s.add_argument("--tune-vision", action="store_true",
                           help="also train the Florence-2 vision side (the paper's stage 1; slower: no feature cache)")
            s.add_argument("--vision-lr", type=float, default=None, help="learning rate of the vision side (default --lr)")
        else:
            s.add_argument("--independent-turns", action="store_true",
                           help="train each QA turn as its own single-turn sample (packed: image stored once); "
                                "only for conversations whose questions do not refer to each other")
        s.add_argument("--no-feature-cache", action="store_true",
                       help="recompute image features every step even with a frozen vision side")
        _add_loop_args(s, epochs=epochs, batch_size=16, lr=1e-3)
        s.set_defaults(func=run_stage, stage=stage, resumable=True)

    r = tsub.add_parser("recipe", help="synthetic data, Florence-2, stage 1, stage 2 and evaluation in one command")
    r.add_argument("--preset", default="small", help="model preset (default small)")
    r.add_argument("--out", required=True, help="output directory; a rerun reuses finished stages")
    r.add_argument("--n", type=int, default=None, help="number of synthetic images (default 3000)")
    r.add_argument("--image-size", type=int, default=None, help="image side (default: the preset's)")
    r.add_argument("--seed", type=int, default=42, help="training seed (default 42)")
    r.add_argument("--data-seed", type=int, default=0, help="data generator seed (default 0)")
    r.add_argument("--tune-vision", action="store_true", help="stage 1 also trains the vision side")
    r.add_argument("--florence2-epochs", type=float, default=None, help="Florence-2 pretraining epochs")
    r.add_argument("--pretrain-epochs", type=float, default=None, help="stage 1 epochs")
    r.add_argument("--finetune-epochs", type=float, default=None, help="stage 2 epochs")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    r.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=run_recipe, resumable=True)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _loop_config(args, stage: str, **extra):
    from model.training.config import TrainConfig

    from workbench.commands._common import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size {args.micro_batch_size}: must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps {args.max_steps}: must be at least 1")
    if args.epochs <= 0:
        raise UserError(f"--epochs {args.epochs}: must be positive")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr}: must be positive")
    if args.save_every < 0:
        raise UserError(f"--save-every {args.save_every}: must be 0 (only at the end) or more")
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after {args.stop_after}: must be at least 1")
    return TrainConfig(out_dir=args.out, stage=stage, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
                       warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm or None, bf16=args.bf16,
                       gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                       save_total_limit=args.save_total_limit, resume=args.resume, stop_after=args.stop_after,
                       seed=args.seed, num_threads=args.threads, progress=not args.quiet, engine=args.engine,
                       **extra)


def _check_out(args) -> None:
    """Refuse a bad --model/--preset and an unusable --out before anything heavy is imported."""
    from pathlib import Path

    from model.training.layout import latest_checkpoint
    from workbench.commands._common import UserError, check_model_arg, check_output

    check_model_arg(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    check_output(out)
    if not args.resume and latest_checkpoint(out) is not None:
        raise UserError(f"--out {out} already holds checkpoints; add --resume to continue that run, "
                        "or choose a new --out")


def _open(args):
    from workbench.commands._common import open_model

    if getattr(args, "model", None) is None and getattr(args, "image_size", None):
        from model.loading import build_model

        return build_model(args.preset or args._default_preset, image_size=args.image_size)
    return open_model(args)


def _summary(history, out) -> None:
    """One line: the losses, and where the model is - OUT/model only once the stage has finished; a run
    stopped early (--stop-after) names the checkpoint to resume from instead."""
    import os
    from pathlib import Path

    from model.training.layout import FINAL_DIR, latest_checkpoint, stage_finished

    if not history or int(os.environ.get("RANK", "0")) != 0:  # one line per run, not one per process
        return
    first, last = history[0], history[-1]
    losses = f"trained {last['step']} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}"
    if stage_finished(out):
        print(f"{losses}; model in {Path(out) / FINAL_DIR}")
    else:
        ckpt = latest_checkpoint(out)
        where = f"checkpoint in {ckpt}; " if ckpt is not None else ""
        print(f"{losses}; stopped before the end of the schedule: {where}add --resume to continue")


def run_florence2(args) -> int:
    from pathlib import Path

    from workbench.commands._common import UserError

    _check_out(args)
    config = _loop_config(args, "florence2")
    data = Path(args.data)
    if not (data / "florence2_tasks.json").is_file():
        raise UserError(f"--data {data}: no florence2_tasks.json there; make the data with "
                        f"`fvl data synth --kind scenes --out {data}`")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from model.training.florence2 import train_florence2

    model, processor = _open(args)
    if model.config.encoder_type != "florence2":
        raise UserError(f"the model's encoder is {model.config.encoder_type!r}; Florence-2 pretraining needs florence2")
    try:
        _, history = train_florence2(model, processor, data, config, tasks=tasks, split_tasks=args.split_tasks,
                                     loss_per=args.loss_per)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    _summary(history, args.out)
    return 0


def run_stage(args) -> int:
    from pathlib import Path

    from workbench.commands._common import UserError

    _check_out(args)
    data = Path(args.data)
    llava = data / ("pretrain.json" if args.stage == "pretrain" else "instruct.json") if data.is_dir() else data
    if not llava.is_file():
        raise UserError(f"--data {data}: no {llava.name} found; pass a `fvl data synth` directory or a LLaVA .json file")
    tune_vision = bool(getattr(args, "tune_vision", False))
    extra = dict(template=args.template, tune_vision=tune_vision, vision_lr=getattr(args, "vision_lr", None),
                 cache_features=False if (args.no_feature_cache or tune_vision) else None,
                 independent_turns=bool(getattr(args, "independent_turns", False)))
    config = _loop_config(args, args.stage, **extra)
    from model.training.vlm import train_stage

    model, processor = _open(args)
    try:
        history = train_stage(model, processor, llava, config, image_folder=args.image_folder)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    _summary(history, args.out)
    return 0


def run_recipe(args) -> int:
    import contextlib
    import json
    import sys

    from model.presets import PRESETS, REAL_SIZE_PRESETS
    from workbench.commands._common import UserError, check_output

    if args.preset not in PRESETS or args.preset in REAL_SIZE_PRESETS:
        small = [p for p in PRESETS if p not in REAL_SIZE_PRESETS]
        raise UserError(f"--preset {args.preset}: the CPU recipe trains from scratch; choose one of {', '.join(small)}")
    check_output(args.out)
    if args.n is not None and args.n < 20:
        raise UserError(f"--n {args.n}: the recipe needs at least 20 images (train/val/test splits)")
    for name in ("image_size", "threads", "florence2_epochs", "pretrain_epochs", "finetune_epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be positive")
    from model.training.recipe import RecipeConfig, run_recipe as _run

    rc = RecipeConfig(progress=not args.quiet, seed=args.seed, data_seed=args.data_seed, tune_vision=args.tune_vision,
                      threads=args.threads)
    if args.n is not None:
        rc.n_images = args.n
    if args.image_size is not None:
        rc.image_size = args.image_size
    for stage in ("florence2", "pretrain", "finetune"):
        epochs = getattr(args, f"{stage}_epochs")
        if epochs is not None:
            getattr(rc, stage)["epochs"] = epochs
    # With --json, stdout carries exactly one JSON object; logs go to stderr.
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = _run(args.preset, args.out, rc, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("count", "color", "shape", "position", "reading", "existence", "overall"):
            print(f"{key:>10}: {result[key]:.3f}  (chance {result['chance'].get(key, float('nan')):.3f})"
                  if key != "overall" else f"{key:>10}: {result[key]:.3f}")
        print(f" florence2: {result['florence2']}")
        print(f"   minutes: {result['minutes']}")
    return 0
