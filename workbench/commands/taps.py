"""`fvl taps`: list a model's tap names with their shapes (batch 1)."""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_model_args

    p = sub.add_parser("taps", help="list the tap names of a model with their shapes")
    add_model_args(p)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--match", default=None, help="only taps matching these patterns, e.g. 'prompt.*,depth'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from model.presets import REAL_SIZE_PRESETS
    from workbench.commands._common import UserError, open_model

    if not args.model and (args.preset or "") in REAL_SIZE_PRESETS:
        from model.loading import build_model

        model, processor = build_model(args.preset, device="meta")
    else:
        model, processor = open_model(args)
    shapes, views = _shapes(model, processor, args, UserError)
    if args.json:
        print(json.dumps({k: list(v) for k, v in shapes.items()}))
        return 0
    width = max(len(k) for k in shapes)
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {tuple(shape)}")
    if views and (not args.match or "fusion.input" in shapes):
        print("views of fusion.input: " + ", ".join(f"fusion.input[{k}] = channels {a}:{b}" for k, (a, b) in views.items()))
    return 0


def _shapes(model, processor, args, UserError):
    from workbench.taps import TapError, fusion_views, resolve, tap_shapes

    check = getattr(getattr(model, "config", None), "check_position_limits", None)
    if args.image_size is not None and check is not None:
        try:
            check(args.image_size)
        except ValueError as exc:
            raise UserError(f"--image-size {args.image_size}: {exc}") from None
    shapes = tap_shapes(model, args.image_size, processor=processor)
    if args.match:
        try:
            keep = set(resolve(model, args.match))
        except TapError as exc:
            raise UserError(f"--match {args.match}: {exc}") from exc
        shapes = {k: v for k, v in shapes.items() if k in keep}
    return shapes, fusion_views(model)
