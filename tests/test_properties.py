"""Property-based tests (hypothesis) of the small codecs everything else trusts.

* location tokens (`workbench.data.loc_tokens`): properties that tests/test_data_loc.py does not state -
  monotonicity, bin centres as fixed points, clipping, `<OD>`-style multi-box groups;
* conversation masking (`model.processing`): for random questions/answers and every template, the loss
  covers exactly the answer tokens and their terminator, and the image placeholder expands to
  `processor.num_image_tokens` tokens that are never trained;
* the store index merge (`workbench.store.merge_index`): merging partial merges equals merging
  everything, and the winning row is the one in the latest shard;
* capture-time pooling (`workbench.taps.pool_tensor`): shapes, constants stay constant, mean == grid1,
  grid{k} == block means when k divides the side.

Examples are few and small (settings below) so the file runs in seconds.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.processing import IGNORE_INDEX, IMAGE_TOKEN
from workbench.data.loc_tokens import NUM_BINS, dequantize, parse_region_string, quantize, region_string
from workbench.store import merge_index
from workbench.taps import pool_tensor

FAST = settings(deadline=None, max_examples=30)

# ---------------------------------------------------------------------------------------------
# Location tokens
# ---------------------------------------------------------------------------------------------
sizes = st.integers(min_value=1, max_value=4000)


@FAST
@given(size=sizes, a=st.floats(-100, 5000, allow_nan=False), b=st.floats(-100, 5000, allow_nan=False))
def test_quantize_is_monotone_and_clipped(size, a, b):
    lo, hi = sorted((a, b))
    qa, qb = quantize(lo, size), quantize(hi, size)
    assert 0 <= qa <= qb <= NUM_BINS - 1  # order kept, always a valid bin (outside coords clip)
    if lo <= 0:
        assert qa == 0
    if hi >= size:
        assert qb == NUM_BINS - 1


@FAST
@given(size=sizes, index=st.integers(0, NUM_BINS - 1))
def test_bin_centre_maps_back_to_its_bin(size, index):
    centre = dequantize(index, size)
    assert 0 < centre < size
    assert quantize(centre, size) == index


@FAST
@given(size=sizes, index=st.one_of(st.integers(max_value=-1), st.integers(min_value=NUM_BINS)))
def test_dequantize_refuses_out_of_range_bins(size, index):
    with pytest.raises(ValueError, match="location bin"):
        dequantize(index, size)


label_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=12).map(str.strip).filter(bool)
bins4 = st.lists(st.integers(0, NUM_BINS - 1), min_size=4, max_size=4)


@FAST
@given(st.lists(st.tuples(label_text, st.lists(bins4, min_size=1, max_size=3)), min_size=1, max_size=4))
def test_od_groups_give_one_box_per_four_tokens_with_the_label(groups):
    text = "".join(label + "".join(f"<loc_{b}>" for box in boxes for b in box) for label, boxes in groups)
    parsed = parse_region_string(text)  # default size 1000: boxes in bin units (centres)
    expected = [(label, tuple(b + 0.5 for b in box)) for label, boxes in groups for box in boxes]
    assert [p[0] for p in parsed] == [e[0] for e in expected]
    for (_, got), (_, want) in zip(parsed, expected):
        assert got == pytest.approx(want)


@FAST
@given(label_text, st.sampled_from(["<", ">"]), label_text)
def test_region_labels_cannot_inject_tokens(a, bracket, b):
    with pytest.raises(ValueError, match="cannot contain"):
        region_string([(a + bracket + b, (0, 0, 1, 1))], 10, 10)


# ---------------------------------------------------------------------------------------------
# Conversation masking
# ---------------------------------------------------------------------------------------------
# Any text without '<' (so no special token such as <image> or <|end|> can appear inside an answer).
free_text = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)),
                    min_size=1, max_size=24)
TERMINATOR = {"plain": "\n</s>", "phi3": "<|end|>\n", "llama3": "<|eot_id|>"}


def _check_masking(processor, ids: list[int], labels: list[int], answers: list[str], template: str) -> None:
    tok = processor.llm_tokenizer
    assert len(ids) == len(labels)
    # a label is either ignored or the token itself (no shift here: the LM shifts)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "".join(a + TERMINATOR[template] for a in answers)
    image_id = processor.image_token_id
    assert ids.count(image_id) == processor.num_image_tokens
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == image_id)
    # everything before the first answer token is prompt: never trained
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert set(labels[:first]) == {IGNORE_INDEX} and ids.index(image_id) < first


@FAST
@given(template=st.sampled_from(["plain", "phi3", "llama3"]), question=free_text, answer=free_text)
def test_labels_cover_exactly_the_answer_and_its_terminator(tiny, template, question, answer):
    _, processor = tiny
    ids, labels = processor.encode_conversation([(question, answer)], template)
    _check_masking(processor, ids, labels, [answer], template)
    # a generation prompt (no answer) trains nothing and still carries the image
    gen_ids, gen_labels = processor.encode_conversation([(question, None)], template)
    assert set(gen_labels) == {IGNORE_INDEX} and gen_ids.count(processor.image_token_id) == processor.num_image_tokens
    assert ids[: len(gen_ids)] == gen_ids  # the prompt is a prefix of the training sequence


@FAST
@given(template=st.sampled_from(["phi3", "llama3"]),
       turns=st.lists(st.tuples(free_text, free_text), min_size=2, max_size=3))
def test_multi_turn_trains_every_answer_and_one_image(tiny, template, turns):
    _, processor = tiny
    # a user who types <image> in a later turn does not get a second image
    turns = [(q if i == 0 else IMAGE_TOKEN + q, a) for i, (q, a) in enumerate(turns)]
    ids, labels = processor.encode_conversation(turns, template)
    _check_masking(processor, ids, labels, [a for _, a in turns], template)


@FAST
@given(answers=st.lists(free_text, min_size=1, max_size=3), side=st.sampled_from(["left", "right"]))
def test_collate_padding_never_trains_pads(tiny, answers, side):
    _, processor = tiny
    samples = [processor.encode_conversation([("q", a)], "plain") for a in answers]
    batch = processor.collate(samples, padding_side=side)
    for row, (ids, labels) in enumerate(samples):
        mask = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][mask].tolist() == ids
        assert batch["labels"][row][mask].tolist() == labels
        assert (batch["labels"][row][~mask] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------
# Store index merge
# ---------------------------------------------------------------------------------------------
@st.composite
def rank_rows(draw):
    """Per-rank index rows over a few ids, with shard numbers increasing in write order per rank."""
    n_ranks = draw(st.integers(1, 3))
    out = []
    for rank in range(n_ranks):
        rows, shard = [], 0
        for _ in range(draw(st.integers(0, 6))):
            item = draw(st.sampled_from(["a", "b", "c", "d"]))
            if draw(st.booleans()):
                shard += draw(st.integers(0, 1))
                rows.append({"id": item, "status": "ok", "shard": f"rank{rank}-{shard:06d}.safetensors",
                             "row": draw(st.integers(0, 3)), "error": None, "labels": {"r": rank}})
            else:
                rows.append({"id": item, "status": "failed", "shard": None, "row": None,
                             "error": draw(st.sampled_from(["e1", "e2", "e3"])), "labels": {}})
        out.append(rows)
    return out


@FAST
@given(rank_rows(), st.data())
def test_merging_partial_merges_equals_merging_everything(by_rank, data):
    full = merge_index(by_rank)
    cut = data.draw(st.integers(0, len(by_rank)))
    assert merge_index([merge_index(by_rank[:cut]), merge_index(by_rank[cut:])]) == full


@FAST
@given(rank_rows())
def test_the_ok_row_in_the_latest_shard_wins(by_rank):
    merged = {r["id"]: r for r in merge_index(by_rank)}
    for item in merged:
        oks = [r for rows in by_rank for r in rows if r["id"] == item and r["status"] == "ok"]
        if not oks:
            assert merged[item]["status"] == "failed"
            continue

        def key(r):
            rank, num = r["shard"][4:].split(".")[0].split("-")
            return int(num), int(rank), r["row"], json.dumps(r, sort_keys=True)

        assert merged[item] == max(oks, key=key)


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 8))  # batch, channels, side


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@FAST
@given(shapes, st.integers(1, 4), st.integers(0, 2**16))
def test_pooling_maps(shape, k, seed):
    b, c, side = shape
    x = _rand((b, c, side, side), seed)
    assert pool_tensor(x, "map", "none") is x
    mean = pool_tensor(x, "map", "mean")
    assert mean.shape == (b, c) and torch.allclose(mean, x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.equal(pool_tensor(x, "map", "global"), mean)  # maps have no global token
    assert torch.allclose(pool_tensor(x, "map", "grid1")[:, 0], mean, atol=1e-6)
    grid = pool_tensor(x, "map", f"grid{k}")
    assert grid.shape == (b, k * k, c)
    if side % k == 0:  # k divides the side: each cell is the mean of its block
        s = side // k
        blocks = x.reshape(b, c, k, s, k, s).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
        assert torch.allclose(grid, blocks, atol=1e-5)
    const = torch.full((b, c, side, side), 3.25)
    assert torch.allclose(pool_tensor(const, "map", f"grid{k}"), torch.full((b, k * k, c), 3.25))


@FAST
@given(shapes, st.integers(1, 4), st.booleans(), st.integers(0, 2**16))
def test_pooling_tokens(shape, k, has_global, seed):
    b, d, side = shape
    n = side * side + (1 if has_global else 0)
    x = _rand((b, n, d), seed)
    patches = x[:, 1:] if has_global else x
    mean = pool_tensor(x, "tokens", "mean", has_global)
    assert mean.shape == (b, d) and torch.allclose(mean, patches.mean(dim=1), atol=1e-6)
    glob = pool_tensor(x, "tokens", "global", has_global)
    assert torch.equal(glob, x[:, 0]) if has_global else torch.allclose(glob, mean)
    assert torch.allclose(pool_tensor(x, "tokens", "grid1", has_global)[:, 0], mean, atol=1e-5)
    grid = pool_tensor(x, "tokens", f"grid{k}", has_global)
    assert grid.shape == (b, k * k, d)
    const = torch.full((b, n, d), -1.5)
    if has_global:
        const[:, 0] = 100.0  # the global token never leaks into grid cells
    assert torch.allclose(pool_tensor(const, "tokens", f"grid{k}", has_global), torch.full((b, k * k, d), -1.5))


@FAST
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**16))
def test_pooling_sequences_respects_the_mask(b, t, h, seed):
    x = _rand((b, t, h), seed)
    lengths = torch.randint(1, t + 1, (b,), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    pooled = pool_tensor(x, "seq", "mean", mask=mask)
    for i in range(b):
        assert torch.allclose(pooled[i], x[i, : lengths[i]].mean(dim=0), atol=1e-6)
    assert torch.equal(pool_tensor(x, "seq", "global"), x[:, 0])


@FAST
@given(shapes, st.booleans(), st.sampled_from(["mean", "global"]), st.integers(0, 2**16))
def test_stored_features_pool_later_as_at_capture(shape, has_global, how, seed):
    """An analysis pooling a stored token map or spatial map (`model.tokens.to_vectors`, numpy in) gets the
    numbers capture-time pooling (`pool_tensor`) would have stored."""
    from model.tokens import to_vectors

    b, d, side = shape
    tokens = _rand((b, side * side + (1 if has_global else 0), d), seed)
    expect = pool_tensor(tokens, "tokens", how, has_global)
    assert torch.allclose(torch.from_numpy(to_vectors(tokens.numpy(), has_global, how)), expect, atol=1e-6)
    maps = _rand((b, d, side, side), seed + 1)
    assert torch.allclose(torch.from_numpy(to_vectors(maps.numpy(), how=how)), pool_tensor(maps, "map", how),
                          atol=1e-6)
    vectors = tokens[:, 0].numpy()
    assert (to_vectors(vectors) == vectors).all()            # already pooled: unchanged
