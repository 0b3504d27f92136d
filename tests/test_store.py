"""Tests of the on-disk feature store: round trips, resume, crashes, failures, ranks."""
from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench.store.reader as reader_mod
import workbench.store.writer as writer_mod
from workbench.store import (
    FeatureStore,
    StoreFormatError,
    StoreLockedError,
    StoreMismatchError,
    StoreWriter,
    StoreWriteError,
    merge_index,
    read_index_file,
)
from workbench.store.index import read_all_ranks

REPO = Path(__file__).resolve().parents[1]


def manifest(**over):
    m = {
        "model_id": "tiny-test",
        "config_hash": "c0ffee",
        "dataset_fingerprint": "data-1",
        "pool": "none",
        "taps": {"depth": {"shape": [5, 4]}, "fusion.input": {"shape": [5, 12]}, "score": {"shape": [], "dtype": "float32"}},
        "views": {"fusion.input": {"depth": [0, 4], "caption": [4, 8], "ocr": [8, 12]}},
    }
    m.update(over)
    return m


def item_tensors(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {
        "depth": rng.standard_normal((5, 4)).astype(np.float32),
        "fusion.input": rng.standard_normal((5, 12)).astype(np.float32),
        "score": np.float32(i * 0.5),
    }


def write(path, ids, **kw):
    with StoreWriter(path, manifest(), **kw) as w:
        for i in ids:
            w.add(f"item{i:03d}", item_tensors(i), labels={"n": i, "parity": "even" if i % 2 == 0 else "odd"})
    return w


# ----------------------------------------------------------------------------- round trip


def test_round_trip_values_labels_and_dtypes(tmp_path):
    write(tmp_path / "s", range(11), shard_size=4)
    s = FeatureStore(tmp_path / "s")
    assert s.items == [f"item{i:03d}" for i in range(11)] and len(s) == 11
    assert s.taps == ["depth", "fusion.input", "score"]
    assert s.manifest["dtype"] == "float16" and s.manifest["format_version"] == 2
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == [f"rank0-{k:06d}.safetensors" for k in range(3)]
    depth = s.load("depth")
    assert depth.shape == (11, 5, 4) and depth.dtype == np.float16
    expected = np.stack([item_tensors(i)["depth"] for i in range(11)])
    np.testing.assert_allclose(depth.astype(np.float32), expected, rtol=1e-3, atol=1e-3)
    score = s.load("score", dtype="float64")
    assert score.dtype == np.float64 and score.tolist() == [i * 0.5 for i in range(11)]
    labels = s.labels()
    assert s.label_names() == ["n", "parity"]
    assert labels["n"].tolist() == list(range(11)) and labels["parity"][3] == "odd"
    subset = ["item007", "item002", "item009"]
    t = s.load("fusion.input", subset, as_="torch", dtype=torch.float32)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t[1].numpy(), item_tensors(2)["fusion.input"], atol=2e-3)
    assert s.labels(subset)["n"].tolist() == [7, 2, 9]
    assert s.check() == []


def test_torch_inputs_and_views(tmp_path):
    with StoreWriter(tmp_path / "s", manifest(), shard_size=3) as w:
        for i in range(5):
            w.add(f"x{i}", {k: torch.as_tensor(v).requires_grad_(False) for k, v in item_tensors(i).items()})
    s = FeatureStore(tmp_path / "s")
    full = s.load("fusion.input")
    # torch's cast rounds exactly like numpy's
    np.testing.assert_array_equal(full, np.stack([item_tensors(i)["fusion.input"].astype(np.float16) for i in range(5)]))
    ocr = s.load("fusion.input[ocr]")
    assert ocr.shape == (5, 5, 4) and s.tap_shape("fusion.input[caption]") == (5, 4)
    np.testing.assert_array_equal(ocr, full[..., 8:12])
    np.testing.assert_array_equal(s.load("fusion.input[depth]", ["x3"]), full[3:4, :, 0:4])
    assert "fusion.input[ocr]" in s.view_names
    with pytest.raises(ValueError, match="no view 'grounding'.*depth, caption, ocr"):
        s.load("fusion.input[grounding]")
    with pytest.raises(ValueError, match="stored taps: depth"):
        s.load("vision.stage9")


def test_load_reads_only_the_requested_tap(tmp_path, monkeypatch):
    write(tmp_path / "s", range(9), shard_size=4)
    s = FeatureStore(tmp_path / "s")
    seen: list[tuple[str, str]] = []
    real_open = reader_mod.open_shard

    class Spy:
        def __init__(self, path):
            self.fh = real_open(path)
            self.path = Path(path).name

        def __enter__(self):
            self.fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def get_slice(self, name):
            seen.append((self.path, name))
            return self.fh.get_slice(name)

        def get_tensor(self, name):
            seen.append((self.path, name))
            return self.fh.get_tensor(name)

    monkeypatch.setattr(reader_mod, "open_shard", Spy)
    s.load("fusion.input[caption]", ["item005", "item006"])
    assert seen == [("rank0-000001.safetensors", "fusion.input")]  # one shard, one tensor
    seen.clear()
    batches = list(s.iter_batches("depth", 4))
    assert {name for _, name in seen} == {"depth"}
    assert [len(ids) for ids, _ in batches] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([a for _, a in batches]), s.load("depth"))


def test_iter_batches_storage_order_covers_everything(tmp_path):
    with StoreWriter(tmp_path / "s", manifest(), shard_size=3) as w:
        for i in [5, 1, 9, 3, 7, 0, 2]:
            w.add(f"id{i}", item_tensors(i))
    s = FeatureStore(tmp_path / "s")
    got = list(s.iter_batches("score", 2, order="storage"))
    assert [i for ids, _ in got for i in ids] == ["id5", "id1", "id9", "id3", "id7", "id0", "id2"]
    for ids, arr in got:
        np.testing.assert_array_equal(arr, s.load("score", ids))


# ----------------------------------------------------------------------------- resume, failures


def test_resume_skips_done_and_failed_items(tmp_path):
    path = tmp_path / "s"
    with StoreWriter(path, manifest(), shard_size=4) as w:
        for i in range(6):
            w.add(f"item{i:03d}", item_tensors(i))
        w.add_failure("item006", "RuntimeError: image is corrupt", labels={"n": 6})
    with StoreWriter(path, manifest(), shard_size=4) as w:
        assert w.done_ids() == {f"item{i:03d}" for i in range(7)}
        with pytest.raises(ValueError, match="already stored"):
            w.add("item001", item_tensors(1))
        for i in range(7, 10):
            w.add(f"item{i:03d}", item_tensors(i))
    s = FeatureStore(path)
    assert s.items == [f"item{i:03d}" for i in range(10) if i != 6]
    assert s.failed == {"item006": "RuntimeError: image is corrupt"}
    rows = {r["id"]: r for r in s.index()}
    assert rows["item006"]["status"] == "failed" and rows["item006"]["shard"] is None
    with pytest.raises(KeyError, match="failed at capture"):
        s.load("depth", ["item006"])
    # retry_failed: the failed item is offered again and, once it succeeds, ok beats failed
    with StoreWriter(path, manifest(), retry_failed=True) as w:
        assert "item006" not in w.done_ids() and "item001" in w.done_ids()
        w.add("item006", item_tensors(6))
    s = FeatureStore(path)
    assert "item006" in s.items and s.failed == {} and len(s) == 10
    np.testing.assert_allclose(s.load("score", ["item006"]), [3.0])


def test_manifest_mismatch_is_refused(tmp_path):
    write(tmp_path / "s", range(2))
    with pytest.raises(StoreMismatchError, match=r"model_fingerprint differs.*weights changed.*'tiny-test'.*'other'.*new --out"):
        StoreWriter(tmp_path / "s", manifest(model_id="other", model_fingerprint="f" * 64))
    # the same weights under another name (a path typed differently) resume
    StoreWriter(tmp_path / "s", manifest(model_id="/abs/path/")).close()
    taps = manifest()["taps"] | {"depth": {"shape": [5, 8]}}
    with pytest.raises(StoreMismatchError, match=r"taps differs.*tap 'depth'"):
        StoreWriter(tmp_path / "s", manifest(taps=taps))
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        StoreWriter(tmp_path / "s", manifest(dataset_fingerprint="data-2"))
    with pytest.raises(StoreMismatchError, match="dtype"):
        StoreWriter(tmp_path / "s", manifest(dtype="float32"))
    # extra, non-identity fields may differ
    StoreWriter(tmp_path / "s", manifest(note="second run")).close()
    assert FeatureStore(tmp_path / "s").manifest.get("note") is None


def test_not_a_store_and_bad_version(tmp_path):
    with pytest.raises(StoreFormatError, match="not a feature store"):
        FeatureStore(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StoreFormatError, match="new --out"):
        StoreWriter(tmp_path, manifest())
    write(tmp_path / "s", range(1))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match="format_version 99"):
        FeatureStore(tmp_path / "s")


def test_bad_items_get_clear_errors(tmp_path):
    with StoreWriter(tmp_path / "s", manifest()) as w:
        t = item_tensors(0)
        with pytest.raises(ValueError, match=r"missing \['score'\]"):
            w.add("a", {k: v for k, v in t.items() if k != "score"})
        with pytest.raises(ValueError, match="without the batch dimension"):
            w.add("a", t | {"depth": t["depth"][None]})
        with pytest.raises(ValueError, match="beyond float16's range.*float32"):
            w.add("a", t | {"depth": np.full((5, 4), 1e6, np.float32)})
        big = torch.zeros(5, 4, dtype=torch.bfloat16)
        big[2, 1] = -7e4
        with pytest.raises(ValueError, match="beyond float16's range"):
            w.add("a", t | {"depth": big})
        nan = torch.tensor(t["depth"])
        nan[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="NaN/inf"):
            w.add("nan", t | {"depth": nan})
        w.add("a", t)
        with pytest.raises(ValueError, match="already added"):
            w.add("a", t)
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            w.add("b", t, labels={"obj": object()})
    s = FeatureStore(tmp_path / "s")
    assert s.items == ["a", "nan"] and np.isnan(s.load("depth", ["nan"])[0, 0, 0])


def test_integer_taps_keep_their_dtype(tmp_path):
    m = {"model_id": "m", "taps": {"tokens": {"shape": [3], "dtype": "int64"}, "x": {"shape": [2]}}}
    with StoreWriter(tmp_path / "s", m) as w:
        with pytest.raises(ValueError, match="stored as int64 but got float64"):
            w.add("a", {"tokens": np.zeros(3), "x": np.zeros(2)})
        w.add("a", {"tokens": torch.tensor([1, 2, 2**40]), "x": np.array([1, 2], dtype=np.uint16)})
    s = FeatureStore(tmp_path / "s")
    assert s.load("tokens").dtype == np.int64 and s.load("tokens").tolist() == [[1, 2, 2**40]]
    assert s.load("x").tolist() == [[1.0, 2.0]]


def test_shard_rows_bounded_by_bytes(tmp_path):
    big = {"model_id": "m", "taps": {"x": {"shape": [1024, 256]}}}  # 512 KiB per item in float16
    with StoreWriter(tmp_path / "s", big, shard_size=256, max_shard_mb=2) as w:
        assert w.rows_per_shard == 4


# ----------------------------------------------------------------------------- damage and crashes


def test_torn_index_line_is_tolerated_and_repaired(tmp_path):
    path = tmp_path / "s"
    write(path, range(5), shard_size=2)
    index = path / "index" / "rank0.jsonl"
    with open(index, "ab") as fh:
        fh.write(b'{"id": "item099", "shard": "rank0-0000')  # died mid-append
    s = FeatureStore(path)
    assert len(s) == 5 and "item099" not in s
    write(path, range(5, 8), shard_size=2)
    rows = read_index_file(index)
    assert [r["id"] for r in rows] == [f"item{i:03d}" for i in range(8)]
    assert index.read_bytes().endswith(b"\n")
    assert len(FeatureStore(path)) == 8


def test_orphan_shard_is_ignored_and_removed(tmp_path):
    path = tmp_path / "s"
    write(path, range(4), shard_size=2)
    orphan = path / "shards" / "rank0-000002.safetensors"
    orphan.write_bytes((path / "shards" / "rank0-000000.safetensors").read_bytes())
    (path / "shards" / ".rank0-000003.safetensors.123.tmp").write_bytes(b"half")
    s = FeatureStore(path)
    assert len(s) == 4 and s.check() == []
    write(path, range(4, 5), shard_size=2)
    assert not (path / "shards" / ".rank0-000003.safetensors.123.tmp").exists()
    s = FeatureStore(path)
    assert len(s) == 5 and s.check() == []
    np.testing.assert_allclose(s.load("score", ["item004"]), [2.0])


def test_full_disk_keeps_flushed_items(tmp_path, monkeypatch):
    path = tmp_path / "s"
    real_save = writer_mod.save_file
    calls = {"n": 0}

    def flaky_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"partial shard bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(writer_mod, "save_file", flaky_save)
    w = StoreWriter(path, manifest(), shard_size=2)
    for i in range(3):
        w.add(f"item{i:03d}", item_tensors(i))
    with pytest.raises(StoreWriteError, match="disk is full.*rerun the same command") as info:
        w.add("item003", item_tensors(3))
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in (path / "shards").iterdir()] == ["rank0-000000.safetensors"]
    s = FeatureStore(path)
    assert s.items == ["item000", "item001"] and s.check() == []
    # space is back: the buffered items are written by the next flush
    w.close()
    s = FeatureStore(path)
    assert s.items == ["item000", "item001", "item002", "item003"] and s.check() == []


CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np
    import workbench.store as store
    import workbench.store.writer as store_writer

    path, mode, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank, world = int(sys.argv[4]), int(sys.argv[5])
    if mode in ("before_rename", "after_rename", "after_index", "torn"):
        seen = {{"n": 0}}
        point = "after_index" if mode == "torn" else mode
        def hook(p):
            if p == point:
                seen["n"] += 1
                if seen["n"] == arg:
                    if mode == "torn":  # cut the last index line in half
                        f = os.path.join(path, "index", f"rank{{rank}}.jsonl")
                        os.truncate(f, os.path.getsize(f) - 30)
                    os._exit(137)
        store_writer._fault_hook = hook
    with store.StoreWriter(path, manifest(), rank=rank, world_size=world, shard_size=4) as w:
        done = w.done_ids()
        added = 0
        for i in range(rank, 30, world):
            item = f"item{{i:03d}}"
            if item in done:
                continue
            if mode == "kill" and added == arg:
                print("READY", flush=True)
                time.sleep(60)
            if i % 7 == 3:
                w.add_failure(item, f"synthetic failure {{i}}", labels={{"n": i}})
            else:
                w.add(item, item_tensors(i), labels={{"n": i}})
            added += 1
    """
)


def run_child(script, path, mode="none", arg=0, rank=0, world=1):
    cmd = [sys.executable, str(script), str(path), mode, str(arg), str(rank), str(world)]
    if mode == "kill":
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "READY"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        return proc.returncode
    return subprocess.run(cmd, timeout=60).returncode


def snapshot(path):
    s = FeatureStore(path)
    assert s.check() == []
    raw = [r for rows in read_all_ranks(Path(path)) for r in rows]
    ok_ids = [r["id"] for r in raw if r["status"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids)), "an item was stored twice"
    referenced = {r["shard"] for r in raw if r["status"] == "ok"}
    on_disk = {p.name for p in (Path(path) / "shards").iterdir()}
    assert on_disk == referenced, "orphan or temp files left behind"
    return {
        "items": s.items,
        "failed": s.failed,
        "labels": s.labels()["n"].tolist(),
        **{tap: s.load(tap) for tap in s.taps},
    }


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    script = root / "child.py"
    helpers = inspect.getsource(manifest) + "\n" + inspect.getsource(item_tensors)
    script.write_text(CHILD.format(repo=str(REPO)).replace("import workbench.store as store\n", "import workbench.store as store\n" + helpers, 1))
    reference = root / "reference"
    assert run_child(script, reference) == 0
    return script, snapshot(reference)


@pytest.mark.parametrize(
    "crashes",
    [
        [("kill", 0)],
        [("kill", 9)],
        [("before_rename", 2)],
        [("after_rename", 1)],
        [("after_rename", 3)],
        [("after_index", 2)],
        [("torn", 2)],
        [("kill", 5), ("after_rename", 2), ("torn", 1)],
    ],
)
def test_crash_then_resume_matches_uninterrupted_run(crash_env, tmp_path, crashes):
    script, expected = crash_env
    path = tmp_path / "s"
    for mode, arg in crashes:
        assert run_child(script, path, mode, arg) in (137, -signal.SIGKILL)
        # at every crash point the store is readable and holds correct, complete items
        partial = FeatureStore(path)
        assert partial.check() == [] and set(partial.items) < set(expected["items"])
        pos = [expected["items"].index(i) for i in partial.items]
        np.testing.assert_array_equal(partial.load("depth"), expected["depth"][pos])
    if crashes == [("after_rename", 1)]:
        assert (path / "shards" / "rank0-000000.safetensors").exists() and len(FeatureStore(path)) == 0
    if crashes == [("torn", 2)]:
        assert not (path / "index" / "rank0.jsonl").read_bytes().endswith(b"\n")
    assert run_child(script, path) == 0
    got = snapshot(path)
    assert got["items"] == expected["items"] and got["failed"] == expected["failed"]
    assert got["labels"] == expected["labels"]
    for tap in ("depth", "fusion.input", "score"):
        np.testing.assert_array_equal(got[tap], expected[tap])


def test_crashed_two_rank_run_resumed_with_one_rank(crash_env, tmp_path):
    script, expected = crash_env
    path = tmp_path / "s"
    assert run_child(script, path, "after_rename", 2, rank=0, world=2) == 137
    assert run_child(script, path, "kill", 4, rank=1, world=2) == -signal.SIGKILL
    assert run_child(script, path, rank=0, world=1) == 0
    got = snapshot(path)
    assert got["items"] == expected["items"] and got["failed"] == expected["failed"]
    np.testing.assert_array_equal(got["fusion.input"], expected["fusion.input"])


# ----------------------------------------------------------------------------- ranks


def test_two_ranks_write_then_merge(tmp_path):
    path = tmp_path / "s"
    w0 = StoreWriter(path, manifest(), rank=0, world_size=2, shard_size=2)
    w1 = StoreWriter(path, manifest(), rank=1, world_size=2, shard_size=2)
    with pytest.raises(StoreLockedError, match="rank 1"):
        StoreWriter(path, manifest(), rank=1, world_size=2)
    for i in range(8):
        (w0 if i % 2 == 0 else w1).add(f"item{i:03d}", item_tensors(i), labels={"n": i})
    w1.add_failure("item009", "boom")
    w0.add("item009", item_tensors(9), labels={"n": 9})  # rank 0 succeeded where rank 1 failed
    assert {"item000", "item002", "item001", "item003"} <= w0.done_ids()
    w0.close()
    w1.close()
    shards = sorted(p.name for p in (path / "shards").iterdir())
    assert shards[0].startswith("rank0-") and shards[-1].startswith("rank1-")
    s = FeatureStore(path)
    assert s.items == [f"item{i:03d}" for i in (0, 1, 2, 3, 4, 5, 6, 7, 9)] and s.failed == {}
    assert s.labels()["n"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    np.testing.assert_allclose(s.load("score"), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4.5])
    with StoreWriter(path, manifest(), rank=0, world_size=1) as w:
        assert w.done_ids() == set(s.items)


# ----------------------------------------------------------------------------- merge_index


def _rows_strategy():
    row = st.fixed_dictionaries({
        "id": st.sampled_from([f"i{k}" for k in range(6)]),
        "status": st.sampled_from(["ok", "failed"]),
        "k": st.integers(0, 3),
        "row": st.integers(0, 3),
        "error": st.sampled_from(["e1", "e2"]),
    })
    return st.lists(st.lists(row, max_size=8), max_size=4)


def _materialise(raw):
    out = []
    for rank, rows in enumerate(raw):
        out.append([
            {"id": r["id"], "status": "ok", "shard": f"rank{rank}-{r['k']:06d}.safetensors", "row": r["row"], "error": None, "labels": {}}
            if r["status"] == "ok"
            else {"id": r["id"], "status": "failed", "shard": None, "row": None, "error": r["error"], "labels": {}}
            for r in rows
        ])
    return out


@settings(max_examples=200, deadline=None)
@given(_rows_strategy(), st.randoms(use_true_random=False))
def test_merge_index_properties(raw, rnd):
    by_rank = _materialise(raw)
    merged = merge_index(by_rank)
    ids = [r["id"] for r in merged]
    assert ids == sorted(set(ids))  # sorted, no duplicates
    assert set(ids) == {r["id"] for rows in by_rank for r in rows}  # nothing missing
    ok_ids = {r["id"] for rows in by_rank for r in rows if r["status"] == "ok"}
    assert {r["id"] for r in merged if r["status"] == "ok"} == ok_ids  # ok beats failed
    shuffled = list(by_rank)
    rnd.shuffle(shuffled)
    assert merge_index(shuffled) == merged  # independent of the order ranks are read in
    assert merge_index([merged]) == merged  # idempotent


def test_merge_index_prefers_latest_shard_and_last_failure():
    rows = [
        [
            {"id": "a", "status": "failed", "shard": None, "row": None, "error": "first"},
            {"id": "a", "status": "failed", "shard": None, "row": None, "error": "second"},
            {"id": "b", "status": "ok", "shard": "rank0-000001.safetensors", "row": 0},
            {"id": "b", "status": "ok", "shard": "rank0-000004.safetensors", "row": 2},
        ]
    ]
    merged = merge_index(rows)
    assert merged[0]["error"] == "second"
    assert merged[1]["shard"] == "rank0-000004.safetensors"


def test_load_scattered_rows_matches_full_load(tmp_path):
    write(tmp_path / "s", range(20), shard_size=20)
    s = FeatureStore(tmp_path / "s")
    full = s.load("fusion.input[caption]")
    for picks in ([0, 9, 10, 19, 5], [3, 4, 6], [6, 4, 3], [12]):  # sparse runs, dense span, reversed, single
        got = s.load("fusion.input[caption]", [f"item{i:03d}" for i in picks])
        np.testing.assert_array_equal(got, full[picks])


def test_benchmark_runs_at_tiny_size():
    import argparse

    from benchmarks import store as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--small", "3", "--large", "9", "--taps", "2", "--tokens", "5", "--dim", "4",
                                          "--shard-size", "2", "--read-small", "20", "--read-large", "60"]))
    assert result["items"] == 9 and result["rss_3_mb"] > 0 and result["rss_9_mb"] > 0
    assert result["rss_ratio"] > 0 and result["write_items_s"] > 0 and result["read_mb_s"] >= 0
    assert result["read_items"] == [20, 60] and result["read_rss_60_mb"] > 0 and result["read_rss_ratio"] > 0


# ----------------------------------------------------------------------------- format 2: digests, old stores


@settings(max_examples=100, deadline=None)
@given(_rows_strategy())
def test_columnar_index_merges_like_merge_index(tmp_path_factory, raw):
    from workbench.store.index import rewrite_index_file
    from workbench.store.table import load_table

    root = tmp_path_factory.mktemp("idx")
    (root / "index").mkdir()
    by_rank = _materialise(raw)
    for rank, rows in enumerate(by_rank):
        rewrite_index_file(root / "index" / f"rank{rank}.jsonl", rows)
    table = load_table(root)
    expected = merge_index(by_rank)
    ok = [r for r in expected if r["status"] == "ok"]
    assert [table.id_at(p) for p in range(len(table))] == [r["id"] for r in ok]
    assert [(table.shard_names[table.shard[p]], int(table.row[p])) for p in range(len(table))] == \
        [(r["shard"], r["row"]) for r in ok]
    assert {i: r["error"] for i, r in table.failed.items()} == {r["id"]: r["error"] for r in expected if r["status"] == "failed"}


def test_slices_membership_and_digests(tmp_path):
    write(tmp_path / "s", range(10), shard_size=4)
    s = FeatureStore(tmp_path / "s")
    np.testing.assert_array_equal(s.load("depth", slice(3, 8)), s.load("depth")[3:8])
    assert "item004" in s and "item099" not in s and "item0041" not in s
    rows = read_index_file(tmp_path / "s" / "index" / "rank0.jsonl")
    assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in rows)
    from workbench.store import verify_store

    assert verify_store(s)["damaged"] == []


def test_a_format_1_store_stays_readable_and_is_not_resumed(tmp_path):
    """A store as the previous version wrote it: no digests, format_version 1, model named by path."""
    from safetensors.numpy import save_file

    path = tmp_path / "old"
    (path / "shards").mkdir(parents=True)
    (path / "index").mkdir()
    m = manifest(model_id="/some/model")
    m.update(format_version=1, dtype="float16", taps={"depth": {"shape": [5, 4], "dtype": "float16"}}, views={})
    (path / "manifest.json").write_text(json.dumps(m))
    arr = np.stack([item_tensors(i)["depth"] for i in range(3)]).astype(np.float16)
    save_file({"depth": arr}, str(path / "shards" / "rank0-000000.safetensors"),
              metadata={"ids": json.dumps(["a", "b", "c"])})
    rows = [{"id": i, "shard": "rank0-000000.safetensors", "row": k, "status": "ok", "error": None, "labels": {"n": k}}
            for k, i in enumerate("abc")]
    (path / "index" / "rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = FeatureStore(path)
    np.testing.assert_array_equal(s.load("depth"), arr)
    assert s.labels()["n"].tolist() == [0, 1, 2] and s.check() == []
    with pytest.raises(StoreMismatchError, match="store format 1.*stays readable.*new --out"):
        StoreWriter(path, {**manifest(), "taps": m["taps"], "views": {}, "model_fingerprint": "f" * 64})


def test_fvl_store_verify_reports_and_repairs(tmp_path, capsys):
    from workbench.cli import main as fvl

    write(tmp_path / "s", range(10), shard_size=4)
    assert fvl(["store", "verify", str(tmp_path / "s")]) == 0
    assert "0 damaged shards" in capsys.readouterr().out
    (tmp_path / "s" / "shards" / "rank0-000001.safetensors").unlink()
    assert fvl(["store", "verify", str(tmp_path / "s"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["damaged"] == [{"shard": "rank0-000001.safetensors", "problem": "missing", "items": 4}]
    assert fvl(["store", "verify", str(tmp_path / "s"), "--repair"]) == 0
    assert "capture the 4 items again" in capsys.readouterr().out
    s = FeatureStore(tmp_path / "s")
    assert len(s) == 6 and s.check() == []
    with StoreWriter(tmp_path / "s", manifest()) as w:  # a rerun captures exactly the lost items
        assert {f"item{i:03d}" for i in range(10)} - w.done_ids() == {f"item{i:03d}" for i in range(4, 8)}
    assert fvl(["store", "verify", str(tmp_path / "nope")]) == 2
    assert "not a feature store" in capsys.readouterr().err
