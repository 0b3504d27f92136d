"""Synthetic scenes (determinism, truth consistency), `fvl data synth`, datasets and LLaVA files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from workbench.cli import main as fvl
from workbench.data import (
    CHANCE,
    COLORS,
    QA_TYPES,
    SHAPES,
    WORDS,
    DatasetError,
    LlavaFormatError,
    Sample,
    generate_scene,
    load_florence2_tasks,
    load_qa,
    load_scenes,
    normalize_answer,
    open_dataset,
    parse_region_string,
    read_llava,
    write_llava,
)
from workbench.data.synth import OUTPUT_FILES, synth_scenes

SIZE = 128
SEEDS = range(64)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(s, SIZE) for s in SEEDS]


# ----------------------------------------------------------------------------- generator


def test_vocabularies_and_chance():
    assert len(SHAPES) >= 4 and len(COLORS) >= 6 and len(WORDS) >= 60 and len(set(WORDS)) == len(WORDS)
    assert set(CHANCE) == set(QA_TYPES)
    assert CHANCE["count"] == 1 / 4 and CHANCE["existence"] == 1 / 2 and CHANCE["reading"] == 1 / len(WORDS)
    # colours are well separated: every pair differs by > 100 in RGB distance
    rgb = np.array(list(COLORS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 100


def test_same_seed_same_scene_different_seed_differs():
    a, b, c = generate_scene(7, SIZE), generate_scene(7, SIZE), generate_scene(8, SIZE)
    assert a.image.tobytes() == b.image.tobytes() and a.to_dict() == b.to_dict()
    assert a.image.tobytes() != c.image.tobytes() and a.to_dict() != c.to_dict()
    # the truth does not depend on whether pixels were drawn
    assert generate_scene(7, SIZE, render=False).to_dict() == a.to_dict()


def test_fixed_counts_and_bad_arguments():
    s = generate_scene(1, SIZE, n_objects=4, n_words=2)
    assert len(s.objects) == 4 and len(s.words) == 2
    with pytest.raises(ValueError, match="too small"):
        generate_scene(1, 32)
    with pytest.raises(ValueError, match="n_objects"):
        generate_scene(1, SIZE, n_objects=9)
    with pytest.raises(ValueError, match="non-negative"):
        generate_scene(-1, SIZE)


def test_text_size_sets_the_font_size_and_keeps_the_layout_valid():
    big = [generate_scene(s, 192, text_size=(0.13, 0.19)) for s in range(24)]
    fonts = [w.font_size for s in big for w in s.words]
    default = [w.font_size for s in range(24) for w in generate_scene(s, 192).words]
    assert fonts and default
    # a crowded scene may shrink a word by 2 px per failed placement round, never grow it
    assert max(fonts) <= round(0.19 * 192) and np.median(fonts) >= 0.13 * 192
    assert max(default) <= round(0.11 * 192) < np.median(fonts)
    for s in big:
        boxes = [o.bbox for o in s.objects] + [w.bbox for w in s.words]
        assert all(0 <= b[0] < b[2] <= 192 and 0 <= b[1] < b[3] <= 192 for b in boxes)
        assert all(_gap(boxes[i], boxes[j]) >= 2 for i in range(len(boxes)) for j in range(i + 1, len(boxes)))
    for bad in ((0.2, 0.1), (0.01, 0.05), (0.1, 0.5), "big"):
        with pytest.raises(ValueError, match="text_size"):
            generate_scene(1, 192, text_size=bad)


def test_words_choose_the_reading_vocabulary_and_keep_the_layout():
    vocab = ("cat", "dog", "car", "fish")
    for seed in range(12):
        small, default = generate_scene(seed, SIZE, words=vocab), generate_scene(seed, SIZE)
        assert all(w.text in vocab for w in small.words)
        # same draws, so the same objects and the same number of words: only the texts differ
        assert [o.bbox for o in small.objects] == [o.bbox for o in default.objects]
        assert len(small.words) == len(default.words)
        reading = [q for q in small.qa if q.type == "reading"]
        assert all(q.answer in vocab for q in reading)
    for bad in ("cat", ["cat"], ["cat", "cat"], ["Cat", "dog"], ["cat", "do g"]):
        with pytest.raises(ValueError, match="words"):
            generate_scene(1, SIZE, words=bad)


def _gap(a, b) -> int:
    """Pixels between two boxes along the axis where they are apart (<= 0: overlap or touch)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def test_objects_and_words_never_overlap_or_touch(scenes):
    for s in scenes:
        boxes = [o.bbox for o in s.objects] + [w.bbox for w in s.words]
        for box in boxes:
            assert 0 <= box[0] < box[2] <= SIZE and 0 <= box[1] < box[3] <= SIZE
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert _gap(boxes[i], boxes[j]) >= 2, (s.seed, boxes[i], boxes[j])


def test_pixels_match_boxes_and_colours(scenes):
    for s in scenes:
        if s.background != "plain":
            continue
        arr = np.asarray(s.image).astype(int)
        drawn = np.any(arr != np.array(s.background_color), axis=-1)
        inside = np.zeros_like(drawn)
        for x0, y0, x1, y1 in [o.bbox for o in s.objects] + [w.bbox for w in s.words]:
            inside[max(0, y0 - 1):y1 + 2, max(0, x0 - 1):x1 + 2] = True
        assert not (drawn & ~inside).any(), f"seed {s.seed}: ink outside the ground-truth boxes"
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            patch = arr[y0:y1 + 1, x0:x1 + 1]
            assert np.all(patch == np.array(COLORS[o.color]), axis=-1).sum() > 10, (s.seed, o)
        for w in s.words:
            x0, y0, x1, y1 = w.bbox
            assert drawn[y0:y1, x0:x1].sum() > 5, (s.seed, w)


def _answer_from_truth(q: str, s) -> str:
    """Recompute an answer from objects/words only, by parsing the question."""
    objs = s.objects

    def one(pred):
        hits = [o for o in objs if pred(o)]
        assert len(hits) == 1, f"ambiguous referent in {q!r} (seed {s.seed})"
        return hits[0]

    if q == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(sum(o.shape == m[1] for o in objs))
    if m := re.fullmatch(r"What color is the (?:(small|large) )?(\w+)\?", q):
        return one(lambda o: o.shape == m[2] and m[1] in (None, o.size)).color
    if m := re.fullmatch(r"What shape is the (?:(small|large) )?(\w+) object\?", q):
        return one(lambda o: o.color == m[2] and m[1] in (None, o.size)).shape
    if m := re.fullmatch(r"Is the (\w+) (\w+) on the left or the right\?", q):
        o = one(lambda o: (o.color, o.shape) == (m[1], m[2]))
        assert abs(o.center[0] - SIZE / 2) >= 0.1 * SIZE
        return "left" if o.center[0] < SIZE / 2 else "right"
    if m := re.fullmatch(r"Is the (\w+) (\w+) at the top or the bottom\?", q):
        o = one(lambda o: (o.color, o.shape) == (m[1], m[2]))
        assert abs(o.center[1] - SIZE / 2) >= 0.1 * SIZE
        return "top" if o.center[1] < SIZE / 2 else "bottom"
    if q == "What word is written in the image?":
        assert len(s.words) == 1
        return s.words[0].text
    if m := re.fullmatch(r"What word is written in (\w+)\?", q):
        hits = [w for w in s.words if w.color == m[1]]
        assert len(hits) == 1
        return hits[0].text
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"
    raise AssertionError(f"unexpected question {q!r}")


def test_every_answer_derives_from_ground_truth(scenes):
    seen_types = set()
    existence = []
    for s in scenes:
        for qa in s.qa:
            assert qa.type in QA_TYPES
            assert qa.answer == normalize_answer(qa.answer) and " " not in qa.answer  # single exact-match token
            assert _answer_from_truth(qa.question, s) == qa.answer, (s.seed, qa)
            seen_types.add(qa.type)
            if qa.type == "existence":
                existence.append(qa.answer)
    assert seen_types == set(QA_TYPES)
    assert existence.count("yes") == existence.count("no") == len(scenes)


def test_labels_captions_ocr_and_regions_match_truth(scenes):
    for s in scenes:
        lab = s.labels
        main = max(s.objects, key=lambda o: o.radius)
        assert lab["n_objects"] == len(s.objects) and 1 <= len(s.objects) <= 4
        assert lab["has_text"] == int(bool(s.words)) and lab["n_words"] == len(s.words)
        assert lab["word"] == (s.words[0].text if s.words else "none")
        assert (lab["main_color"], lab["main_shape"], lab["main_size"]) == (main.color, main.shape, main.size)
        assert abs(lab["main_x"] * SIZE - main.center[0]) < 0.01 and 0 <= lab["main_y"] <= 1
        assert lab["main_quadrant"] == f"{'top' if main.center[1] < SIZE / 2 else 'bottom'}_{'left' if main.center[0] < SIZE / 2 else 'right'}"
        assert s.ocr == " ".join(w.text for w in s.words)
        for o in s.objects:
            assert f"{o.color} {o.shape}" in s.caption and f"{o.size} {o.color} {o.shape}" in s.detailed_caption
        for w in s.words:
            assert f'"{w.text}"' in s.caption and f'"{w.text}"' in s.detailed_caption
        # region string decodes to the true boxes within one bin
        truth = {o.name: o.bbox for o in s.objects} | {f"word {w.text}": w.bbox for w in s.words}
        parsed = parse_region_string(s.regions, SIZE, SIZE)
        assert sorted(lab for lab, _ in parsed) == sorted(truth)
        for lab, box in parsed:
            assert all(abs(a - b) <= SIZE / 1000 for a, b in zip(box, truth[lab])), (s.seed, lab)
        assert sorted(lab for lab, _ in parse_region_string(s.od)) == sorted(o.shape for o in s.objects)


def test_normalize_answer():
    assert normalize_answer(" The Red. ") == "red"
    assert normalize_answer("Three") == "3"
    assert normalize_answer('"cat"') == "cat"


# ----------------------------------------------------------------------------- synth CLI


def _synth(out: Path, *extra: str) -> int:
    return fvl(["data", "synth", "--n", "24", "--seed", "5", "--image-size", "64", "--out", str(out),
                "--quiet", "--workers", "1", *extra])


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_synth_writes_everything_and_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _synth(a) == 0 and _synth(b) == 0
    for name in (*OUTPUT_FILES, "manifest.json"):
        assert (a / name).is_file(), name
    assert len(list((a / "images").glob("*.png"))) == 24
    assert _snapshot(a) == _snapshot(b)  # byte-identical

    rows = load_scenes(a)
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 24
    by_split = {sp: {r["id"] for r in rows if r["split"] == sp} for sp in ("train", "val", "test")}
    assert [len(v) for v in by_split.values()] == [19, 3, 2]  # rint of the cumulative fractions 19.2, 21.6, 24
    assert set().union(*by_split.values()) == set(ids)
    assert sum(len(v) for v in by_split.values()) == len(ids)  # a partition

    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["n"] == 24 and manifest["seed"] == 5 and manifest["image_size"] == 64
    import hashlib
    assert manifest["fingerprint"] == hashlib.sha256((a / "scenes.jsonl").read_bytes()).hexdigest()

    pretrain = json.loads((a / "pretrain.json").read_text())
    assert {r["id"] for r in pretrain} == by_split["train"]
    assert all(r["conversations"][0] == {"from": "human", "value": "<image>"} for r in pretrain)
    instruct = json.loads((a / "instruct.json").read_text())
    assert {r["id"] for r in instruct} == by_split["train"]
    for r in instruct:
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    # the QA turns are the image's QA pairs, in a per-image shuffled order (a fixed order lets a small
    # LLM answer by turn position instead of by question)
    qa_by_image: dict[str, list] = {}
    for q in load_qa(a, split="train"):
        qa_by_image.setdefault(q["image_id"], []).append((q["question"], q["answer"]))
    same_order = 0
    for r in instruct:
        conv = r["conversations"]
        turns = [(conv[k]["value"].removeprefix("<image>\n"), conv[k + 1]["value"]) for k in range(0, len(conv), 2)]
        assert sorted(turns) == sorted(qa_by_image[r["id"]])
        same_order += turns == qa_by_image[r["id"]]
    assert same_order < len(instruct) / 2

    qa = load_qa(a)
    assert {q["image_id"] for q in qa} == set(ids) and all(Path(q["image"]).is_file() for q in qa)
    assert {q["type"] for q in load_qa(a, split="train")} <= set(QA_TYPES)
    assert all(q["split"] == "val" for q in load_qa(a, split="val"))
    tasks = load_florence2_tasks(a, tasks=["<OD>"])
    assert len(tasks) == 24 and all(parse_region_string(t["target"]) for t in tasks)
    lines = (a / "labels.csv").read_text().splitlines()
    assert lines[0].startswith("id,split,n_objects") and len(lines) == 25


def test_synth_rerun_noop_conflict_and_resume(tmp_path, capsys):
    d = tmp_path / "d"
    assert _synth(d) == 0
    before = _snapshot(d)
    mtimes = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    capsys.readouterr()
    assert _synth(d) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == mtimes

    assert _synth(d, "--splits", "0.5,0.5") == 2
    err = capsys.readouterr().err
    assert "different arguments" in err and "splits" in err
    assert fvl(["data", "synth", "--n", "25", "--seed", "5", "--image-size", "64", "--out", str(d), "--quiet"]) == 2
    assert "n=24 (now 25)" in capsys.readouterr().err

    # a complete dir that lost an image is repaired by the same command
    (d / "images" / "scene_000003.png").unlink()
    assert _synth(d) == 0
    assert "resumed" in capsys.readouterr().out
    assert _snapshot(d) == before


def _check_option_defines_the_dataset(d, tmp_path, capsys, option: str, bad: str, key: str) -> None:
    """Rerunning `d` without `option` is another dataset (refused, naming `key`); a bad value is refused by name."""
    capsys.readouterr()
    assert _synth(d) == 2
    assert key in capsys.readouterr().err
    assert _synth(tmp_path / "bad", option, bad) == 2
    assert option in capsys.readouterr().err


def test_synth_text_size_is_recorded_and_checked(tmp_path, capsys):
    d = tmp_path / "d"
    assert _synth(d, "--text-size", "0.12,0.16") == 0
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["text_size"] == [0.12, 0.16]
    rows = [json.loads(line) for line in (d / "scenes.jsonl").read_text().splitlines()]
    fonts = [w["font_size"] for r in rows for w in r["words"]]
    assert fonts and max(fonts) <= round(0.16 * 64)
    _check_option_defines_the_dataset(d, tmp_path, capsys, "--text-size", "0.3,0.1", "text_size")
    # a dataset written before the option existed was made with the default size: still complete
    old = tmp_path / "old"
    assert _synth(old) == 0
    m = json.loads((old / "manifest.json").read_text())
    del m["text_size"]
    (old / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert _synth(old) == 0 and "nothing to do" in capsys.readouterr().out


def test_synth_words_set_the_vocabulary_and_the_reading_chance(tmp_path, capsys):
    d = tmp_path / "d"
    assert _synth(d, "--words", "cat,dog,car,fish") == 0
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["words"] == ["cat", "dog", "car", "fish"]
    assert manifest["qa_types"]["reading"]["chance"] == 0.25
    rows = [json.loads(line) for line in (d / "scenes.jsonl").read_text().splitlines()]
    assert {w["text"] for r in rows for w in r["words"]} <= {"cat", "dog", "car", "fish"}
    _check_option_defines_the_dataset(d, tmp_path, capsys, "--words", "cat", "words")
    default = tmp_path / "default"
    assert _synth(default) == 0
    m = json.loads((default / "manifest.json").read_text())
    assert "words" not in m and m["qa_types"]["reading"]["chance"] == round(1 / 64, 6)


def test_synth_resumes_after_interruption(tmp_path, monkeypatch, capsys):
    import workbench.data.synth as synth_mod

    fresh = tmp_path / "fresh"
    assert _synth(fresh) == 0
    real = synth_mod._make_one

    def flaky(job):
        if job[0] == 10:
            raise KeyboardInterrupt
        return real(job)

    d = tmp_path / "d"
    monkeypatch.setattr(synth_mod, "_make_one", flaky)
    assert _synth(d) == 130  # the CLI reports the interruption
    assert not (d / "manifest.json").exists() and not (d / "scenes.jsonl").exists()
    assert len(list((d / "images").glob("*.png"))) == 10
    assert _synth(d, "--seed", "6") == 2  # other arguments cannot hijack a half-written dir
    monkeypatch.setattr(synth_mod, "_make_one", real)
    assert _synth(d) == 0
    assert "resumed" in capsys.readouterr().out
    assert _snapshot(d) == _snapshot(fresh)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert _synth(foreign) == 2
    assert "not empty" in capsys.readouterr().err
    assert _synth(tmp_path / "e", "--splits", "0.5,0.2") == 2
    assert "sum to 1" in capsys.readouterr().err


def test_synth_workers_give_identical_bytes(tmp_path):
    one = synth_scenes(tmp_path / "w1", n=64, seed=2, image_size=64, workers=1, progress=False, log=None)
    two = synth_scenes(tmp_path / "w2", n=64, seed=2, image_size=64, workers=2, progress=False, log=None)
    assert one.fingerprint == two.fingerprint
    assert _snapshot(tmp_path / "w1") == _snapshot(tmp_path / "w2")


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    synth_scenes(d, n=20, seed=1, image_size=64, workers=1, progress=False, log=None)
    return d


def test_open_synthetic_dataset(synth_dir):
    ds = open_dataset(synth_dir)
    assert ds.kind == "synthetic" and len(ds) == 20 and ds.ids == sorted(ds.ids)
    assert ds.label_names[:3] == ["n_objects", "n_words", "has_text"]
    assert set(ds.splits) == {"train", "val", "test"}
    assert sum(len(ds.split(s)) for s in ds.splits) == 20
    shards = [ds.shard(r, 3) for r in range(3)]
    assert sorted(i for sh in shards for i in sh.ids) == ds.ids and max(map(len, shards)) - min(map(len, shards)) <= 1
    item = ds[0]
    assert item.image_path.is_file() and isinstance(item.labels["n_objects"], int)
    assert ds.load(0).size == (64, 64)
    assert open_dataset(synth_dir / "scenes.jsonl").fingerprint == ds.fingerprint
    assert len(ds.fingerprint) == 64 and ds[:5].ids == ds.ids[:5]
    with pytest.raises(DatasetError, match="no split 'dev'"):
        ds.split("dev")


def test_open_llava_and_folder(synth_dir, tmp_path):
    ds = open_dataset(synth_dir / "pretrain.json")
    train = open_dataset(synth_dir).split("train")
    assert ds.kind == "llava" and ds.ids == train.ids
    assert [it.labels for it in ds] == [it.labels for it in train] and ds.splits == ["train"]
    folder = open_dataset(synth_dir / "images")
    assert folder.kind == "folder" and len(folder) == 20 and folder.ids[0] == "scene_000000.png"
    assert folder[0].labels == {} and folder.label_names == []
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes((synth_dir / "images" / "scene_000000.png").read_bytes())
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert open_dataset(tmp_path).ids == ["sub/x.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        open_dataset(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "missing")


def test_heatmap_figures_never_overwrite_another_data_set(synth_dir, tmp_path, capsys):
    before = _snapshot(synth_dir)
    assert fvl(["heatmap", "figures", "--out", str(synth_dir), "--n", "4", "--size", "32"]) == 2
    assert "does not hold stick figures" in capsys.readouterr().err
    assert _snapshot(synth_dir) == before  # its manifest.json and images are untouched
    figs = tmp_path / "figs"
    assert fvl(["heatmap", "figures", "--out", str(figs), "--n", "4", "--size", "32"]) == 0
    first = _snapshot(figs)
    assert fvl(["heatmap", "figures", "--out", str(figs), "--n", "4", "--size", "32"]) == 0  # same arguments
    assert _snapshot(figs) == first
    capsys.readouterr()
    assert fvl(["heatmap", "figures", "--out", str(figs), "--n", "6", "--size", "32"]) == 2
    assert "n=4 (now 6)" in capsys.readouterr().err and _snapshot(figs) == first
    assert fvl(["data", "synth", "--out", str(figs), "--n", "2", "--image-size", "64", "--quiet"]) == 2
    assert "another kind of data set" in capsys.readouterr().err and _snapshot(figs) == first


# ----------------------------------------------------------------------------- LLaVA files


def test_llava_round_trip(synth_dir, tmp_path):
    samples = read_llava(synth_dir / "instruct.json")
    assert samples and all(s.image_path.is_file() for s in samples)
    assert samples[0].conversations[0]["value"].startswith("<image>\n")
    out = write_llava(samples + [Sample("text-only", None, [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "hello"}], {"source": "t"})],
                      tmp_path / "copy.json", image_folder=synth_dir)
    again = read_llava(out, image_folder=synth_dir)
    assert [(s.id, s.image_path, s.conversations) for s in again[:-1]] == [
        (s.id, s.image_path, s.conversations) for s in samples]
    assert again[-1].image_path is None and again[-1].metadata == {"source": "t"}
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": "q"}]}) for i in range(3)))
    assert [s.id for s in read_llava(jsonl)] == ["0", "1", "2"]


def test_llava_error_messages(tmp_path):
    (tmp_path / "img.png").write_bytes(b"x")
    good_turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"id": "s1", "image": "img.png", "conversations": good_turns},
                                   {"id": "s2", "image": "gone/nope.jpg", "conversations": good_turns}]))
    with pytest.raises(LlavaFormatError, match=r"sample 's2'.*gone/nope.jpg not found"):
        read_llava(missing)
    assert len(read_llava(missing, check_images=False)) == 2

    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"id": "a", "conversations": []},\n{"id": "b", "conversations": [}\n]')
    with pytest.raises(LlavaFormatError, match=r"broken.json: line 3, column"):
        read_llava(broken)

    bad_turn = tmp_path / "turn.json"
    bad_turn.write_text(json.dumps([{"id": "t", "conversations": [{"from": "bot", "value": "x"}]}]))
    with pytest.raises(LlavaFormatError, match=r"turn.json: sample 0 \(id 't'\), turn 0"):
        read_llava(bad_turn)

    not_list = tmp_path / "obj.json"
    not_list.write_text('{"id": 1}')
    with pytest.raises(LlavaFormatError, match="JSON list"):
        read_llava(not_list)

    no_id = tmp_path / "noid.json"
    no_id.write_text(json.dumps([{"conversations": good_turns}]))
    with pytest.raises(LlavaFormatError, match="no usable \"id\""):
        read_llava(no_id)

    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"id": "d", "conversations": good_turns}] * 2))
    assert len(read_llava(dup)) == 2
    with pytest.raises(LlavaFormatError, match="repeats id 'd'"):
        read_llava(dup, unique_ids=True)

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"id": 1, "conversations": [{"from": "human", "value": "q"}]}\n{oops}\n')
    with pytest.raises(LlavaFormatError, match=r"bad.jsonl: line 2"):
        read_llava(bad_jsonl)
    with pytest.raises(LlavaFormatError, match="does not exist"):
        read_llava(tmp_path / "absent.json")
