"""The fact-scoring layout (`inference.score_layout`): every scored token sees exactly its unpacked sequence.

Model-free: for each scored position the test rebuilds, from the call's arrays, the (token, RoPE position) pairs its
attention window lets it see, and compares them with the pair's own prompt + response, for every layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from kt_jax.errors import ConfigError
from kt_jax.inference.score_layout import common_preamble
from kt_jax.inference.scoring import plan

PREAMBLE = [1, 50, 51, 52, 53, 54, 55]


def make_pairs(seed: int) -> list[tuple[list[int], list[int]]]:
    """Prompts sharing a 7-token preamble, 1-6 facts each (some empty, one long), a repeated question."""
    rng = np.random.default_rng(seed)
    pairs = []
    for q in range(14):
        prompt = PREAMBLE + rng.integers(100, 200, size=int(rng.integers(1, 12))).tolist() + [9]
        for _ in range(int(rng.integers(1, 7))):
            n = int(rng.choice([0, 1, 2, 5, 9, 17, 40 if q == 3 else 8]))
            pairs.append((prompt, rng.integers(200, 300, size=n).tolist()))
    pairs.append((pairs[0][0], [201, 202]))  # the first question again, after others
    return pairs


def test_a_pair_without_prompt_turns_sharing_off_and_scores_from_its_second_token() -> None:
    pairs = [*make_pairs(seed=3), ([], [5, 6, 7])]
    (call,) = plan(pairs, max_len=96)
    assert common_preamble(pairs) == [] and common_preamble(pairs[:-1]) == PREAMBLE
    x, keys = call.inputs, call.pair_keys
    where = np.flatnonzero(keys[0] == len(pairs) - 1)
    assert [int(x.gather_targets[0, m]) for m in where] == [6, 7]
    assert [visible(call, 0, int(x.gather_idx[0, m])) for m in where] == [[(5, 0)], [(5, 0), (6, 1)]]


def visible(call, r: int, pos: int) -> list[tuple[int, int]]:
    """(token, position) of every key the query at row position `pos` attends to, sorted by position."""
    x, win = call.inputs, call.inputs.windows
    q = win.query_idx.shape[2]
    w, i = divmod(int(win.slot_idx[r, pos]), q)
    assert win.query_idx[r, w, i] == pos
    keys = win.key_idx[r, w][win.allowed[r, w, i]]
    assert len(set(keys.tolist())) == len(keys), "a key seen twice would count twice in the softmax"
    return sorted(((int(x.input_ids[r, k]), int(x.positions[r, k])) for k in keys), key=lambda tp: tp[1])


@pytest.mark.parametrize(("packing", "pack_len", "batch_size"), [
    ("shared", 4096, 1), ("shared", 48, 3), ("shared", 128, 2), ("packed", 128, 2), ("padded", 128, 4)])
def test_every_scored_token_sees_exactly_its_unpacked_sequence(packing: str, pack_len: int, batch_size: int) -> None:
    pairs = make_pairs(seed=1)
    calls = plan(pairs, max_len=96, packing=packing, pack_len=pack_len, batch_size=batch_size)
    seen = {key: 0 for key in range(len(pairs))}
    for call in calls:
        x = call.inputs
        assert x.windows.allowed.shape[:2] == x.windows.query_idx.shape[:2] and x.gather_valid.sum() > 0
        for r, m in zip(*np.nonzero(call.pair_keys >= 0), strict=True):
            key = int(call.pair_keys[r, m])
            prompt, response = pairs[key]
            full, k = prompt + response, seen[key]
            at = len(prompt) - 1 + k  # this position predicts response[k]
            pos = int(x.gather_idx[r, m])
            assert x.gather_valid[r, m] and int(x.gather_targets[r, m]) == full[at + 1]
            assert (int(x.input_ids[r, pos]), int(x.positions[r, pos])) == (full[at], at)
            assert visible(call, r, pos) == [(full[j], j) for j in range(at + 1)]
            seen[key] += 1
    assert seen == {key: len(r) for key, (_, r) in enumerate(pairs)}  # every response token once, empty ones none


def test_shared_layout_holds_the_preamble_once_a_row_and_each_question_once_a_group() -> None:
    pairs = make_pairs(seed=2)
    calls = plan(pairs, max_len=96, pack_len=4096)
    assert len(calls) == 1
    x = calls[0].inputs
    assert x.input_ids[0, :7].tolist() == PREAMBLE and x.input_ids[0].tolist().count(PREAMBLE[1]) == 1
    scored = [(p, r) for p, r in pairs if r]
    unshared = sum(len(p) + len(r) for p, r in scored)
    questions = {tuple(p) for p, _ in scored}
    expected = 7 + sum(len(q) - 8 for q in questions) + sum(1 + len(r) for _, r in scored)
    assert int((x.positions[0] > 0).sum()) + 1 == expected < unshared
    # attention: the windows' query x key slots, far fewer than a dense row's T x T
    assert x.windows.allowed.size < x.input_ids.shape[1] ** 2 / 4


def test_common_preamble() -> None:
    assert common_preamble([([1, 2, 3, 4], [7]), ([1, 2, 3, 5, 6], [8])]) == [1, 2, 3]
    assert common_preamble([([1, 2, 3], [7]), ([1, 2, 3, 4], [8])]) == [1, 2]  # each prompt keeps its last token
    assert common_preamble([([1, 2], [7]), ([3, 2], [8])]) == []
    assert common_preamble([([1, 2, 3], []), ([1, 2, 9], [8]), ([1, 2, 9], [5])]) == [1, 2]  # unscored pairs ignored
    assert common_preamble([]) == [] and common_preamble([([], [1]), ([1, 2, 3], [4])]) == []


def test_plan_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="packing"):
        plan([([1, 2], [3])], packing="tight")
    with pytest.raises(ConfigError, match="more than max_len=4"):
        plan([([1, 2, 3], [4, 5])], max_len=4)
