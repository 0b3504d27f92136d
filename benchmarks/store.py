"""Feature store: peak memory while writing a small vs a 10x larger capture, and throughput.

Each size is written by a fresh subprocess (so peak RSS is that run's alone) through
`StoreWriter`, with items of realistic size (default 6 taps of 577x64 float32, stored as
float16: ~0.44 MB per item on disk). A bounded store keeps `rss_ratio` (large / small) near
1; a store that accumulated items in memory would scale with the item count. A last
subprocess reads every tap of the large store with `iter_batches` and reports read
throughput (page cache warm: the data was just written) and its own peak RSS.

The read case (`read_rss_ratio`) opens stores of 10k and 100k items of one small tap and reads every
row in batches, each in a fresh process: opening holds the index as columns (a few bytes per item) and
reading holds one batch, so the peak RSS of the 100k store should stay within 1.2x of the 10k one.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", type=int, default=200, help="items in the small run (default 200)")
    parser.add_argument("--large", type=int, default=2000, help="items in the large run (default 2000)")
    parser.add_argument("--taps", type=int, default=6, help="taps per item (default 6)")
    parser.add_argument("--tokens", type=int, default=577, help="tokens per tap (default 577)")
    parser.add_argument("--dim", type=int, default=64, help="channels per token (default 64)")
    parser.add_argument("--shard-size", type=int, default=64, help="items per shard (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="read batch size (default 64)")
    parser.add_argument("--torch", action="store_true", help="hand the writer torch tensors, as a capture loop does")
    parser.add_argument("--read-small", type=int, default=10_000, help="items in the small read case (default 10k)")
    parser.add_argument("--read-large", type=int, default=100_000, help="items in the large read case (default 100k)")
    parser.add_argument("--read-dim", type=int, default=16, help="channels per item in the read case (default 16)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed after)")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _child_write(path: str, n: int, taps: int, tokens: int, dim: int, shard_size: int, use_torch: bool) -> dict:
    import numpy as np

    from workbench.store import StoreWriter

    names = [f"tap{t}" for t in range(taps)]
    manifest = {"model_id": "bench", "config_hash": "bench", "taps": {t: {"shape": [tokens, dim]} for t in names}}
    rng = np.random.default_rng(0)
    # A small pool of distinct items, reused: content does not change write cost (no compression).
    pool = [{t: rng.standard_normal((tokens, dim), dtype=np.float32) for t in names} for _ in range(8)]
    if use_torch:
        import torch

        pool = [{t: torch.from_numpy(a) for t, a in item.items()} for item in pool]
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    with StoreWriter(path, manifest, shard_size=shard_size) as writer:
        for i in range(n):
            writer.add(f"item{i:07d}", pool[i % len(pool)], labels={"i": i})
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in Path(path, "shards").iterdir())
    return {"rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before, "seconds": seconds, "bytes": stored}


def _child_read(path: str, batch_size: int) -> dict:
    from workbench.store import FeatureStore

    rss_before = _peak_rss_mb()
    store = FeatureStore(path)
    start = time.perf_counter()
    total = 0
    for tap in store.taps:
        for _, batch in store.iter_batches(tap, batch_size):
            total += batch.nbytes
    return {"rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before, "seconds": time.perf_counter() - start,
            "bytes": total, "items": len(store)}


def _child_write_small(path: str, n: int, dim: int) -> dict:
    """A store of n items of one small tap, written quickly (the read case needs many items, not bytes)."""
    import numpy as np

    from workbench.store import StoreWriter

    row = np.linspace(-1, 1, dim, dtype=np.float32)
    with StoreWriter(path, {"model_id": "bench", "taps": {"x": {"shape": [dim]}}}, shard_size=4096) as writer:
        for i in range(n):
            writer.add(f"item{i:07d}", {"x": row}, labels={"i": i % 10})
    return {"items": n}


def read_case(scratch: Path, small: int, large: int, dim: int, batch_size: int) -> dict:
    """Peak RSS of reading every row of a store of `small` and of `large` items in batches (fresh processes).
    The ratio stays near 1 when memory does not grow with the number of items."""
    out = {}
    for n in (small, large):
        path = scratch / f"read-{n}"
        shutil.rmtree(path, ignore_errors=True)
        _spawn("write-small", str(path), str(n), str(dim))
        out[n] = _spawn("read", str(path), str(batch_size))
        shutil.rmtree(path, ignore_errors=True)
    return {
        "read_items": [small, large],
        f"read_rss_{small}_mb": round(out[small]["rss_mb"], 1),
        f"read_rss_{large}_mb": round(out[large]["rss_mb"], 1),
        "read_rss_ratio": round(out[large]["rss_mb"] / out[small]["rss_mb"], 3),
        "read_rss_imports_mb": round(out[large]["rss_before_mb"], 1),
        f"read_{large}_s": round(out[large]["seconds"], 2),
    }


def _spawn(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.store", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {argv} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fvl-bench-store-"))
    scratch.mkdir(parents=True, exist_ok=True)
    shape = [str(args.taps), str(args.tokens), str(args.dim), str(args.shard_size), str(int(args.torch))]
    try:
        results = {}
        for n in (args.small, args.large):
            out = scratch / f"store-{n}"
            shutil.rmtree(out, ignore_errors=True)
            results[n] = _spawn("write", str(out), str(n), *shape)
        read = _spawn("read", str(scratch / f"store-{args.large}"), str(args.batch_size))
        many = read_case(scratch, args.read_small, args.read_large, args.read_dim, max(args.batch_size, 1024))
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    small, large = results[args.small], results[args.large]
    mb = 2**20
    return {
        "items": args.large,
        "item_mb": round(large["bytes"] / args.large / mb, 3),
        "shard_size": args.shard_size,
        "input": "torch" if args.torch else "numpy",
        f"rss_{args.small}_mb": round(small["rss_mb"], 1),
        f"rss_{args.large}_mb": round(large["rss_mb"], 1),
        "rss_ratio": round(large["rss_mb"] / small["rss_mb"], 3),
        "rss_imports_mb": round(large["rss_before_mb"], 1),
        "write_mb_s": round(large["bytes"] / mb / large["seconds"], 1),
        "write_items_s": round(args.large / large["seconds"], 1),
        "read_mb_s": round(read["bytes"] / mb / read["seconds"], 1),
        "read_rss_mb": round(read["rss_mb"], 1),
        **many,
    }


def _main(argv: list[str]) -> None:
    mode, path, *rest = argv
    if mode == "write":
        n, taps, tokens, dim, shard_size, use_torch = (int(x) for x in rest)
        result = _child_write(path, n, taps, tokens, dim, shard_size, bool(use_torch))
    elif mode == "write-small":
        result = _child_write_small(path, int(rest[0]), int(rest[1]))
    else:
        result = _child_read(path, int(rest[0]))
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
