"""`fvl data`: make and inspect datasets.

    fvl data synth --kind scenes --n 1000 --seed 0 --image-size 384 --out data/scenes [--splits 0.8,0.1,0.1]
    fvl data info PATH            what a dataset holds (kind, size, splits, labels, fingerprint)
    fvl data check PATH           open every image with the robust loader; list every bad one

PATH is a `fvl data synth` directory, a LLaVA .json/.jsonl or a COCO-style .json (with
`--image-folder DIR` when its image paths are relative to another folder), or an image folder
(labels from a Hugging Face `metadata.jsonl`, or from subfolder names).

`--kind scenes` is built in. Another kind NAME is served by a module `workbench.data.NAME`
that defines `synth_dataset(out, n, seed, image_size, splits, progress) -> object`, so other
generators plug in without touching this file.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from workbench.data.dataset import add_image_folder_option

    p = sub.add_parser("data", help="make synthetic datasets and inspect image datasets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    s = dsub.add_parser("synth", help="write a seeded synthetic dataset (images, truth, LLaVA/QA/Florence-2 files)")
    s.add_argument("--kind", default="scenes", help="generator: scenes (shapes + words); others if installed")
    s.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same arguments give identical files (default 0)")
    s.add_argument("--image-size", type=int, default=384, help="square image side in pixels (default 384)")
    s.add_argument("--out", required=True, help="output directory (new or empty; rerun to resume)")
    s.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions (default 0.8,0.1,0.1)")
    s.add_argument("--text-size", default=None, metavar="MIN,MAX",
                   help="scenes: font size of the words as fractions of the image side (default 0.07,0.11); "
                        "small images read better with larger words, e.g. 0.13,0.19 at 192 px")
    s.add_argument("--words", default=None, metavar="W1,W2,...",
                   help="scenes: the reading vocabulary (default: 64 short words); a few words of distinct length "
                        "and outline make reading learnable for a tiny tower, e.g. ox,sun,jet,milk,zebra")
    s.add_argument("--workers", type=int, default=None,
                   help="processes drawing/encoding PNGs (default: one per CPU, up to 8); output is identical for any value")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_synth)

    i = dsub.add_parser("info", help="summarise a dataset: synthetic dir, LLaVA .json or image folder")
    i.add_argument("path")
    add_image_folder_option(i)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=run_info)

    c = dsub.add_parser("check", help="load every image of a dataset with the robust loader and report failures")
    c.add_argument("path")
    add_image_folder_option(c)
    c.add_argument("--min-side", type=int, default=8, help="smallest accepted image side (default 8)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=run_check)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_synth(args) -> int:
    import importlib

    from workbench.commands._common import UserError, check_output
    from workbench.data.synth import SynthError, parse_splits, synth_scenes

    check_output(args.out)
    try:
        splits = parse_splits(args.splits)
        if args.kind == "scenes":
            text_size = None
            if args.text_size is not None:
                try:
                    text_size = tuple(float(v) for v in args.text_size.split(","))
                except ValueError:
                    raise SynthError(f"--text-size {args.text_size!r}: write two fractions, e.g. 0.07,0.11") from None
            words = None if args.words is None else [w.strip() for w in args.words.split(",") if w.strip()]
            synth_scenes(args.out, n=args.n, seed=args.seed, image_size=args.image_size, splits=splits,
                         workers=args.workers, progress=not args.quiet, text_size=text_size, words=words)
            return 0
        module = None
        if args.kind.isidentifier():
            try:
                module = importlib.import_module(f"workbench.data.{args.kind}")
            except ModuleNotFoundError as exc:
                if exc.name != f"workbench.data.{args.kind}":
                    raise UserError(f"--kind {args.kind} needs the package {exc.name!r}; install it") from None
        if module is None or not hasattr(module, "synth_dataset"):
            raise UserError(f"--kind {args.kind}: unknown generator; use --kind scenes "
                            f"(or a module workbench.data.NAME with a synth_dataset function)")
        module.synth_dataset(out=args.out, n=args.n, seed=args.seed, image_size=args.image_size, splits=splits,
                             progress=not args.quiet)
        return 0
    except SynthError as exc:
        raise UserError(str(exc)) from None


def _open(args, check_images: bool = True):
    from workbench.commands._common import UserError
    from workbench.data.dataset import open_dataset

    try:
        return open_dataset(args.path, image_folder=args.image_folder, check_images=check_images)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run_info(args) -> int:
    import json
    from pathlib import Path

    ds = _open(args)
    info = {"kind": ds.kind, "source": str(ds.source), "n": len(ds),
            "splits": {name: len(ds.split(name)) for name in ds.splits},
            "label_names": ds.label_names, "with_captions": len(ds.captions()),
            "missing_images": len(ds.missing()),  # a stat per item; `fvl data check` decodes them too
            "fingerprint": ds.fingerprint}
    manifest = Path(ds.root) / "manifest.json"
    if ds.kind == "synthetic" and manifest.is_file():
        m = json.loads(manifest.read_text())
        info.update({k: m[k] for k in ("seed", "image_size", "generator", "qa_types") if k in m})
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        if key == "qa_types":
            for qtype, st in value.items():
                print(f"{'qa ' + qtype:>16}: {st['n']} questions, chance {st['chance']:.3f}, majority {st['majority']}")
        else:
            print(f"{key:>16}: {value}")
    return 0


def run_check(args) -> int:
    import json

    from tqdm.auto import tqdm

    from workbench.data.images import ImageError, load_image

    from workbench.commands._common import UserError

    if args.min_side < 1:
        raise UserError(f"--min-side {args.min_side}: give a positive number of pixels")
    ds = _open(args, check_images=False)  # a wrong image folder is listed item by item, then explained
    bad = []
    for item in tqdm(ds, desc="checking", unit="img", disable=args.json):
        try:
            load_image(item.image_path, min_side=args.min_side)
        except ImageError as exc:
            bad.append({"id": item.id, "path": str(item.image_path), "error": str(exc)})
    hint = None
    if bad and len(bad) == len(ds) and ds.kind in ("llava", "coco") and not any(
            item.image_path.exists() for item in ds):
        hint = (f"none of the images exist under {ds.root}; pass --image-folder DIR, the folder the file's image "
                "paths are relative to")
    if args.json:
        print(json.dumps({"n": len(ds), "bad": bad, **({"hint": hint} if hint else {})}))
    else:
        for b in bad:
            print(f"{b['id']}: {b['error']}")
        print(f"{len(ds) - len(bad)} of {len(ds)} images load; {len(bad)} bad")
        if hint:
            print(hint)
    return 1 if bad else 0
