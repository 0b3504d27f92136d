"""Training: template masks, loss goes down, exact resume, torchrun data parallel, what gets gradients,
Florence-2 pretraining and its transfer, evaluation metrics, and the `fvl train` / `fvl eval` commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.loading import build_model
from model.processing import IGNORE_INDEX
from model.training.layout import latest_checkpoint, list_checkpoints, stage_finished
from model.training.config import TrainConfig
from model.training.loop import epoch_order
from model.training.vlm import FeatureBank, VLMTask, load_vlm_samples, train_stage, vlm_stage_data
from workbench.cli import main as fvl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads that wait
    for each other make every step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from workbench.data.synth import synth_scenes

    out = tmp_path_factory.mktemp("scenes")
    synth_scenes(out, 24, seed=3, image_size=64, workers=1, progress=False, log=None)
    return out


def fresh_tiny():
    return build_model("tiny", seed=0)


def cfg(tmp_path=None, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path) if tmp_path else None, stage="finetune", batch_size=4, lr=3e-3,
                max_steps=4, warmup_ratio=0.0, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


# ---- templates -----------------------------------------------------------------------------
def _trained_text(processor, ids, labels) -> str:
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    return processor.llm_tokenizer.decode(kept)


def test_template_masks_cover_only_answers(tiny):
    _, proc = tiny
    eos = proc.llm_tokenizer.eos_token
    ids, labels = proc.encode_conversation([("ignored question", "a red circle")], template="plain")
    assert _trained_text(proc, ids, labels) == "a red circle\n" + eos
    assert ids.count(proc.image_token_id) == proc.num_image_tokens
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == proc.image_token_id)
    turns = [("<image>\nWhat color is the star?", "blue"), ("How many shapes are there?", "3")]
    ids, labels = proc.encode_conversation(turns, template="phi3")
    assert _trained_text(proc, ids, labels) == "blue<|end|>\n3<|end|>\n"
    ids, labels = proc.encode_conversation(turns, template="llama3")
    assert _trained_text(proc, ids, labels) == "blue<|eot_id|>3<|eot_id|>"
    text = proc.llm_tokenizer.decode(ids)
    assert "What color is the star?" in text and "How many shapes" in text  # questions are input, not trained


def test_llava_samples_use_template(data_dir, tiny):
    _, proc = tiny
    samples = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")
    assert len(samples) == json.loads((data_dir / "manifest.json").read_text())["split_counts"]["train"]
    answers = _trained_text(proc, samples[0].input_ids, samples[0].labels)
    assert answers.count("<|end|>") == len(json.loads((data_dir / "instruct.json").read_text())[0]["conversations"]) // 2


def test_independent_turns_train_exactly_like_single_turn_samples(data_dir):
    """A packed conversation (shared image prefix, per-turn mask and positions) gives the same summed
    loss and gradients as its turns fed one by one, also batched with padding beside another sample;
    the plain multi-turn encoding does not (its later answers see earlier turns)."""
    model, proc = fresh_tiny()
    model.eval()
    task = VLMTask(model)
    turns = [("What color is the star?", "blue"), ("How many shapes are there?", "3"),
             ("Is there a red circle in the image?", "no")]
    ids, labels, segments = proc.encode_independent_turns(turns, template="phi3")
    assert sorted(set(segments)) == [0, 1, 2, 3]
    assert _trained_text(proc, ids, labels) == "blue<|end|>\n3<|end|>\nno<|end|>\n"
    assert ids.count(proc.image_token_id) == proc.num_image_tokens  # the image is stored once
    other = proc.encode_conversation([("What shape is the blue object?", "square")], template="phi3")
    image = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")[0].image
    bank = FeatureBank(model, proc, progress=False)
    bank.add([image])
    fused = bank.get([image, image])

    def loss_and_grad(batch, fused):
        model.zero_grad(set_to_none=True)
        loss = task(**batch, fused=fused)
        loss.backward()
        return float(loss.detach()), model.mm_projector.encoder_mlp[0].weight.grad.clone()

    packed, g_packed = loss_and_grad(proc.collate([(ids, labels, segments), (*other, None)]), fused)
    single_loss, single_grad = 0.0, 0.0
    for q, a in [*turns, ("What shape is the blue object?", "square")]:
        one, g = loss_and_grad(proc.collate([proc.encode_conversation([(q, a)], template="phi3")]), fused[:1])
        single_loss, single_grad = single_loss + one, single_grad + g
    assert packed == pytest.approx(single_loss, rel=1e-5)
    assert torch.allclose(g_packed, single_grad, rtol=1e-4, atol=1e-7)
    multi, _ = loss_and_grad(proc.collate([proc.encode_conversation(turns, template="phi3"), other]), fused)
    assert abs(multi - single_loss) > 1e-3


def test_task_loss_equals_the_loss_over_full_logits(data_dir):
    """VLMTask runs the LM head only at label positions; the summed loss and the gradients must be
    those of the model's own full logits, for plain and packed batches."""
    from benchmarks.train_step import full_logits_loss

    model, proc = fresh_tiny()
    model.eval()
    samples = load_vlm_samples(proc, data_dir / "instruct.json", "phi3", independent_turns=True)[:3]
    plain = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")[:2]
    bank = FeatureBank(model, proc, progress=False)
    bank.add([s.image for s in samples + plain])
    for chosen in (samples, plain):
        batch = proc.collate([(s.input_ids, s.labels, s.segments) for s in chosen], padding_side="right")
        batch["fused"] = bank.get([s.image for s in chosen])
        model.zero_grad(set_to_none=True)
        ours = VLMTask(model)(**batch)
        ours.backward()
        g_ours = [p.grad.clone() for p in (model.mm_projector.encoder_mlp[0].weight, model.language_model.lm_head.weight)]
        model.zero_grad(set_to_none=True)
        reference = full_logits_loss(model, batch)
        reference.backward()
        assert float(ours) == pytest.approx(float(reference), rel=1e-5)
        for g, p in zip(g_ours, (model.mm_projector.encoder_mlp[0].weight, model.language_model.lm_head.weight)):
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
        assert float(ours) > 0


def test_fvl_bench_train_step_compares_both_losses(capsys):
    assert fvl(["bench", "train-step", "--json", "--preset", "tiny", "--batch", "3", "--repeats", "1",
                "--threads", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 < r["label_tokens"] < r["tokens"] and r["ours_s"] > 0 and r["full_logits_s"] > 0
    assert r["speedup"] == pytest.approx(r["full_logits_s"] / r["ours_s"], rel=1e-2)
    assert r["loss_rel_diff"] < 1e-5
    assert r["bf16_s"] > 0 and r["bf16_speedup"] == pytest.approx(r["ours_s"] / r["bf16_s"], rel=1e-2)
    assert 0 < r["bf16_loss_rel_diff"] < 0.05  # bf16 rounds differently, but it is the same loss
    for side in ("stage2", "florence2"):  # fused vs unfused AdamW: timed, and the same update
        o = r["optimizer"][side]
        assert o["tensors"] > 0 and o["fused_s"] > 0 and o["unfused_s"] > 0
        assert o["speedup"] == pytest.approx(o["unfused_s"] / o["fused_s"], rel=1e-2)
        assert o["max_update_diff"] < 1e-6


def test_loop_uses_the_fused_adamw_on_cpu():
    from model.training.loop import make_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([{"params": [p]}], TrainConfig(), torch.device("cpu"))
    assert opt.param_groups[0]["fused"] is True


def test_independent_turns_config_packs_conversations(data_dir, tmp_path):
    model, proc = fresh_tiny()
    plain = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")
    packed = load_vlm_samples(proc, data_dir / "instruct.json", "phi3", independent_turns=True)
    assert len(packed) == len(plain) and packed[0].segments is not None
    assert _trained_text(proc, packed[0].input_ids, packed[0].labels) == _trained_text(
        proc, plain[0].input_ids, plain[0].labels)  # the same answers are trained
    history = train_stage(model, proc, data_dir / "instruct.json", cfg(independent_turns=True, max_steps=2))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor([h["loss"] for h in history])))
    with pytest.raises(ValueError, match="flash-attention"):
        from model.processing import packed_attention_mask
        packed_attention_mask(torch.zeros(1, 3, dtype=torch.long), "flash_attention_2")


# ---- the loop --------------------------------------------------------------------------------
def test_steps_lower_the_loss_on_a_fixed_batch(data_dir):
    model, proc = fresh_tiny()
    samples = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")[:4]
    history = train_stage(model, proc, samples, cfg(max_steps=8, lr=5e-3))
    losses = [h["loss"] for h in history]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]


def test_training_moves_the_model_to_the_training_device(data_dir, monkeypatch):
    """Batches go to the training device (CUDA wherever one is present): the weights must follow, or a
    GPU machine fails at the first step (what the first run on a lent H200 found)."""
    import model.training.loop as loop_module

    moved = []
    plain_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if isinstance(self, VLMTask):
            moved.append(torch.device(args[0] if args else kwargs["device"]))
        return plain_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    monkeypatch.setattr(loop_module, "default_device", lambda: torch.device("cpu", 0))
    model, proc = fresh_tiny()
    samples = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")[:4]
    train_stage(model, proc, samples, cfg(max_steps=1))
    assert moved == [torch.device("cpu", 0)]


def test_loss_independent_of_micro_batching(data_dir):
    """The step loss is the global-batch token mean, however the batch is split."""
    runs = []
    for micro in (None, 1, 3):
        model, proc = fresh_tiny()
        samples = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")
        runs.append([h["loss"] for h in train_stage(model, proc, samples, cfg(max_steps=3, micro_batch_size=micro))])
    for other in runs[1:]:
        assert other == pytest.approx(runs[0], rel=1e-5, abs=1e-6)


def test_gradients_reach_projector_and_llm_and_vision_only_when_asked(data_dir):
    model, proc = fresh_tiny()
    samples = load_vlm_samples(proc, data_dir / "pretrain.json", "plain")[:2]
    data = vlm_stage_data(samples, proc, bank=None)
    for tune_vision in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_trainable(vision=tune_vision, projector=True, llm=True)
        VLMTask(model)(**data.make_batch([0, 1])).backward()

        def has_grad(module):
            return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

        assert has_grad(model.mm_projector) and has_grad(model.language_model)
        assert has_grad(model.vision_tower) is tune_vision
        if tune_vision:  # depth and breadth paths both carry gradient
            assert has_grad(model.vision_tower.vision_tower) and has_grad(model.vision_tower.encoder)


def test_feature_cache_gives_the_same_loss(data_dir):
    model, proc = fresh_tiny()
    samples = load_vlm_samples(proc, data_dir / "instruct.json", "phi3")[:3]
    bank = FeatureBank(model, proc, progress=False)
    bank.add([s.image for s in samples])
    with torch.no_grad():
        a = VLMTask(model)(**vlm_stage_data(samples, proc, None).make_batch([0, 1, 2]))
        b = VLMTask(model)(**vlm_stage_data(samples, proc, bank).make_batch([0, 1, 2]))
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_resume_gives_the_same_loss_sequence(data_dir, tmp_path):
    def run(out, **kw):
        model, proc = fresh_tiny()
        return train_stage(model, proc, data_dir / "instruct.json", cfg(out, max_steps=7, save_every=2, **kw))

    full = [h["loss"] for h in run(tmp_path / "full")]
    part = run(tmp_path / "cut", stop_after=3)
    assert len(part) == 3 and latest_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    assert not stage_finished(tmp_path / "cut")
    resumed = run(tmp_path / "cut", resume=True)
    assert [h["loss"] for h in resumed] == full  # exact, not approximate
    assert stage_finished(tmp_path / "cut")
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8)) and [r["loss"] for r in rows] == full
    assert len(list_checkpoints(tmp_path / "cut")) <= 2  # save_total_limit
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer_state.json"} <= \
        {p.name for p in ckpt.iterdir()}
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "cut").iterdir())


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, 3, 0)
    assert a != epoch_order(50, 3, 1) and a != epoch_order(50, 4, 0)


DDP_CONFIG = dict(stage="finetune", batch_size=4, micro_batch_size=1, lr=3e-3, max_steps=3, warmup_ratio=0.0,
                  progress=False, seed=1, save_every=0)
TORCHRUN_SCRIPT = textwrap.dedent(f"""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from model.loading import build_model
    from model.training.config import TrainConfig
    from model.training.vlm import train_stage
    data, out = sys.argv[1], sys.argv[2]
    model, proc = build_model("tiny", seed=0)
    hist = train_stage(model, proc, data + "/instruct.json", TrainConfig(out_dir=out, **{DDP_CONFIG!r}))
    assert torch.distributed.get_world_size() == 2
    if int(os.environ["RANK"]) == 0:
        with open(out + "/losses.json", "w") as f:
            json.dump([h["loss"] for h in hist], f)
""")


def test_torchrun_two_processes_match_one(data_dir, tmp_path):
    """Two gloo processes, each with half of every global batch, give the losses of one process."""
    script = tmp_path / "ddp_train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FVL_DIST_BACKEND": "gloo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(torchrun + [str(script), str(data_dir), str(tmp_path / "ddp")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    model, proc_ = fresh_tiny()
    one = [h["loss"] for h in train_stage(model, proc_, data_dir / "instruct.json",
                                          TrainConfig(out_dir=str(tmp_path / "one"), **DDP_CONFIG))]
    assert len(ddp) == len(one) == 3
    assert ddp == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert one[-1] < one[0]


# ---- Florence-2 pretraining ------------------------------------------------------------------
def test_florence2_pretraining_learns_and_transfers(data_dir, tmp_path, capsys):
    from model.training.evaluate import evaluate_florence2
    from model.training.florence2 import (Florence2Task, florence2_stage_data, load_florence2,
                                          load_florence2_samples, train_florence2)

    model, proc = fresh_tiny()
    samples = load_florence2_samples(data_dir, proc.florence2_tokenizer, "train", ("<OCR>", "<DENSE_REGION_CAPTION>"))
    assert all(s.tasks == ["<OCR>", "<DENSE_REGION_CAPTION>"] for s in samples)
    loc = proc.florence2_tokenizer.convert_tokens_to_ids("<loc_0>")
    assert any(loc <= t < loc + 1000 for s in samples for t in s.targets[1])  # regions use <loc_i> tokens
    f2, history = train_florence2(model, proc, data_dir, cfg(tmp_path, stage="florence2", max_steps=6, lr=3e-3,
                                                             batch_size=4), tasks=("<OCR>", "<DENSE_REGION_CAPTION>"))
    assert history[-1]["loss"] < history[0]["loss"]
    # grouping rows by task gives the same loss as one padded pass over all rows
    data = florence2_stage_data(samples, proc)
    batch = data.make_batch([0, 1, 2])
    with torch.no_grad():
        grouped = Florence2Task(f2)(**batch)
        batch.pop("row_task")
        plain = Florence2Task(f2)(**batch)
    assert float(grouped) == pytest.approx(float(plain), rel=1e-4)
    # per-sequence normalisation: each row's token sum over its own length, and the sample counts its rows
    seq_data = florence2_stage_data(samples, proc, per_sequence=True)
    assert [seq_data.label_count(i) for i in range(3)] == [2, 2, 2]
    one_row = {k: (v[:1] if k in ("row_image", "prompt_ids", "prompt_mask", "labels", "row_task") else v)
               for k, v in seq_data.make_batch([0]).items()}
    n_tokens = int((one_row["labels"] != -100).sum())
    with torch.no_grad():
        summed = Florence2Task(f2)(**one_row)
        averaged = Florence2Task(f2, per_sequence=True)(**one_row)
    assert n_tokens > 1 and float(averaged) == pytest.approx(float(summed) / n_tokens, rel=1e-5)
    # the extractor now holds the pretrained weights: same depth features as the native model
    px = proc.images([samples[0].image])
    with torch.no_grad():
        native = f2.model.get_image_features(px).pooler_output
        ours = model.vision_tower.depth(px)
    assert torch.allclose(native, ours, atol=1e-5)
    assert stage_finished(tmp_path)
    f2b, _ = load_florence2(tmp_path / "model" / "florence2")
    assert torch.equal(f2b.lm_head.weight, f2.lm_head.weight)
    metrics = evaluate_florence2(f2, proc, data_dir, "test", limit=2)
    assert metrics["n_images"] == 2
    assert fvl(["eval", "florence2", "--model", str(tmp_path / "model"), "--data", str(data_dir), "--limit", "2",
                "--device", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("ocr_exact_match", "caption_token_f1", "region_recall_iou50"))
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["device"] == "cpu" and cli["dtype"] == "bfloat16" and cli["n_images"] == 2


def test_fvl_train_florence2_passes_the_objective_options(data_dir, tmp_path):
    """--split-tasks and --loss-per reach the trainer: with one (image, task) row per sample and rows as the
    normaliser, every step's label count is its batch size."""
    assert fvl(["train", "florence2", "--preset", "tiny", "--image-size", "64", "--data", str(data_dir),
                "--out", str(tmp_path), "--max-steps", "2", "--batch-size", "3", "--split-tasks",
                "--loss-per", "sequence", "--save-every", "0", "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "florence2" and "tokens" in r]
    assert len(steps) == 2 and all(r["tokens"] == 3 for r in steps)


def test_ocr_exact_match_is_also_reported_on_images_with_text(data_dir, tiny, monkeypatch):
    """An image without text is an OCR hit when the model writes nothing: a model that never reads
    still scores the share of text-free images, so the metric over images with text comes too."""
    import model.training.evaluate as ev
    from workbench.data.dataset import load_florence2_tasks

    _, proc = tiny
    monkeypatch.setattr(ev, "florence2_generate", lambda f2, tok, px, task, n: [""] * px.shape[0])
    metrics = ev.evaluate_florence2(torch.nn.Linear(1, 1), proc, data_dir, "test", limit=None)
    ocr = [r["target"] for r in load_florence2_tasks(data_dir, split="test", tasks=["<OCR>"])]
    empty = sum(not t.strip() for t in ocr)
    assert 0 < empty < len(ocr)  # the data has both kinds of image
    assert metrics["ocr_exact_match"] == pytest.approx(empty / len(ocr), abs=1e-4)
    assert metrics["ocr_exact_match_with_text"] == 0.0
    assert metrics["ocr_images_with_text"] == len(ocr) - empty


def test_dense_tags_put_label_factors_on_the_box_centre_cell(data_dir, tiny):
    from model.training.florence2 import load_florence2_samples
    from model.training.florence2_tags import TagVocab, dense_tags, tag_loss, tag_vocabulary

    vocab = TagVocab(first=["red", "word"], last=["circle", "farm"], words=["circle", "farm", "red", "word"])
    regions = [("red circle", (0, 0, 240, 240)), ("word farm", (760, 510, 990, 740))]
    cells, boxes, multi_hot = dense_tags(regions, vocab, grid=4, global_token=True)
    assert cells.shape == (17, 2) and multi_hot.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert boxes[1].tolist() == pytest.approx([0.0, 0.0, 0.24, 0.24]) and boxes[12].tolist() == pytest.approx([0.76, 0.51, 0.99, 0.74])
    assert float(boxes[[k for k in range(17) if k not in (1, 12)]].abs().sum()) == 0.0
    # red circle: centre (120, 120) -> cell (0, 0) = token 1; word farm: centre (875, 625) -> cell (2, 3) = token 12
    assert cells[1].tolist() == [0, 0] and cells[12].tolist() == [1, 1]
    background = [k for k in range(17) if k not in (1, 12)]
    assert all(cells[k].tolist() == [2, 2] for k in background)  # background ids = vocabulary sizes
    cells_ng = dense_tags(regions, vocab, grid=4, global_token=False).cells
    assert cells_ng.shape == (16, 2) and cells_ng[0].tolist() == [0, 0] and cells_ng[11].tolist() == [1, 1]
    # the loss prefers logits that name the right factors on the right cells
    good = torch.full((1, 17, vocab.size), -5.0)
    for k in range(17):
        good[0, k, int(cells[k, 0])] = 5.0
        good[0, k, 3 + int(cells[k, 1])] = 5.0
    good[0, 0, 6:10] = 5.0
    good[0, :, 10:] = torch.special.logit(boxes.clamp(1e-4, 1 - 1e-4))
    bad = good.roll(1, dims=1)
    args = (cells[None], boxes[None], multi_hot[None], vocab, 5.0, True)
    assert float(tag_loss(good, *args)) < 0.1 < float(tag_loss(bad, *args))
    # one sample per (image, task) when asked, with the same targets
    model, proc = tiny
    tasks = ("<OCR>", "<DENSE_REGION_CAPTION>")
    whole = load_florence2_samples(data_dir, proc.florence2_tokenizer, "train", tasks)
    split = load_florence2_samples(data_dir, proc.florence2_tokenizer, "train", tasks, split_tasks=True)
    assert len(split) == sum(len(s.tasks) for s in whole) and all(len(s.tasks) == 1 for s in split)
    assert sorted(map(str, (t for s in split for t in s.targets))) == sorted(map(str, (t for s in whole for t in s.targets)))
    found = tag_vocabulary(whole)
    assert "word" in found.first and set(found.words) == set(found.first) | set(found.last)


# ---- evaluation --------------------------------------------------------------------------------
def test_metrics():
    from model.training.metrics import box_iou, region_recall, token_f1

    assert token_f1("A red circle.", "a red circle") == 1.0
    assert token_f1("red square", "red circle") == pytest.approx(0.5)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    ref = "red circle<loc_100><loc_100><loc_200><loc_200>word cat<loc_500><loc_500><loc_600><loc_550>"
    assert region_recall(ref, ref) == (2, 2)
    near = "red circle <loc_105><loc_102><loc_205><loc_198>"  # spaces from decoding are tolerated
    assert region_recall(near, ref) == (1, 2)
    assert region_recall("blue circle<loc_100><loc_100><loc_200><loc_200>", ref) == (0, 2)  # label must match
    assert region_recall("garbage <loc_1>", ref) == (0, 2)


def test_evaluate_vqa_reports_every_type_and_batching_is_exact(data_dir):
    from model.training.evaluate import answer_questions, evaluate_vqa
    from workbench.data.dataset import load_qa

    model, proc = fresh_tiny()
    result = evaluate_vqa(model, proc, data_dir, "test", batch_size=16, return_predictions=True)
    types = {r["type"] for r in load_qa(data_dir, split="test")}
    assert set(result["accuracy"]) == types | {"overall"}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert set(result["chance"]) == types
    rows = load_qa(data_dir, split="test")[:5]
    batched = answer_questions(model, proc, [r["image"] for r in rows], [r["question"] for r in rows], batch_size=5,
                               max_new_tokens=4)
    single = [answer_questions(model, proc, [r["image"]], [r["question"]], batch_size=1, max_new_tokens=4)[0]
              for r in rows]
    assert batched == single  # left padding does not change greedy answers


# ---- commands ----------------------------------------------------------------------------------
def test_cli_finetune_then_eval(data_dir, tmp_path, capsys):
    out = tmp_path / "s2"
    args = ["train", "finetune", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--save-every", "1", "--quiet", "--independent-turns"]
    assert fvl(args) == 0
    assert (out / "model" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    assert json.loads((out / "model" / "trainer_state.json").read_text())["config"]["independent_turns"] is True
    assert fvl(args) == 2  # existing checkpoints without --resume
    assert "--resume" in capsys.readouterr().err
    assert fvl(["eval", "vqa", "--model", str(out / "model"), "--data", str(data_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "overall" in result["accuracy"]
    assert fvl(["eval", "vqa", "--model", str(out / "checkpoint-2"), "--data", str(data_dir), "--json",
                "--limit", "4"]) == 0  # any checkpoint loads
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"]["overall"] == 4


def test_cli_bad_input(tmp_path, capsys):
    assert fvl(["eval", "vqa", "--preset", "tiny", "--data", str(tmp_path), "--json"]) == 2
    assert "fvl data synth" in capsys.readouterr().err
    assert fvl(["train", "pretrain", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "pretrain.json" in capsys.readouterr().err
    assert fvl(["train", "recipe", "--preset", "florence-vl-8b", "--out", str(tmp_path / "r")]) == 2


def test_cli_eval_runs_on_the_device_and_dtype_asked_for(data_dir, tmp_path, capsys):
    """No skip on a CPU-only machine: there the CUDA request is refused by name, on a GPU it runs there."""
    base = ["eval", "vqa", "--preset", "tiny", "--data", str(data_dir), "--json", "--limit", "4"]
    assert fvl(base + ["--device", "cpu", "--dtype", "bfloat16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["dtype"] == "bfloat16" and result["n"]["overall"] == 4
    rc = fvl(base + ["--device", "cuda"])
    captured = capsys.readouterr()
    if torch.cuda.is_available():
        assert rc == 0 and json.loads(captured.out.strip().splitlines()[-1])["device"] == "cuda"
    else:
        assert rc == 2 and "--device cuda: CUDA was requested but CUDA is not available" in captured.err
    assert fvl(base + ["--dtype", "int8"]) == 2
    assert "--dtype int8: not a dtype; choose auto, float32, bfloat16, float16" in capsys.readouterr().err
    assert fvl(base + ["--batch-size", "0"]) == 2
    assert "--batch-size 0: must be at least 1" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert fvl(base + ["--predictions", str(blocker / "preds.jsonl")]) == 2  # refused before any work
    err = capsys.readouterr().err
    assert "--predictions" in err and "Traceback" not in err
    assert fvl(base + ["--predictions", str(tmp_path / "preds.jsonl")]) == 0
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 4
    assert fvl(["eval", "florence2", "--model", str(tmp_path), "--data", str(data_dir), "--device", "gpu"]) == 2
    assert "--device gpu: not a device" in capsys.readouterr().err
