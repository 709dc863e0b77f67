"""Prefix-shared SFT rows (`data.share_prompt_prefix`): each example's loss and gradients equal the plain packed
layout's; the preamble is stored once per row; examples that do not start with it stay plain."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_grouped_dpo import _place, _tiny_model
from test_loader import Bytes, qa

from kt_jax.data.batch import SeqBatch, SharedPrefixBatch
from kt_jax.data.loader import DataConfig, make_dataset
from kt_jax.data.packing import Group, PrefixRows, Segment
from kt_jax.data.records import QARecord
from kt_jax.data.templates import alpaca_prompt, prompt_prefix
from kt_jax.errors import ConfigError
from kt_jax.train.config import OptimConfig
from kt_jax.train.loop import stack_micro, to_device
from kt_jax.train.optimizer import make_optimizer
from kt_jax.train.state import create_state
from kt_jax.train.steps import make_eval_step, make_sft_loss, sft_loss

pytestmark = pytest.mark.timeout(300)


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"max_len": 512, "batch_size": 16, "shuffle": False, "num_epochs": 1, **kw})


def test_prefix_rows_share_once_per_row_and_keep_others_plain() -> None:
    rows = PrefixRows((1, 5, 6), capacity=10, max_rows=2)
    assert rows.add([1, 5, 6, 7, 8, 9], 4)  # shared: costs 3 + 3
    assert rows.add([1, 5, 6, 3, 4], 4)  # shared, same row: costs 2 more (8)
    assert rows.add([9, 9, 9, 9], 2)  # does not start with the prefix: plain, 4 more would be 12: a second row
    assert rows.add([1, 5, 6, 4], 3)  # the prompt ends inside the prefix: plain (no token would predict the answer)
    assert not rows.add([1, 5, 6, 7, 7, 7, 7, 7, 7], 4)  # 6 (+ 3 in row 2) fits no row, and no third may open
    got = rows.rows()
    assert got[0] == [Group((1, 5, 6), [Segment([7, 8, 9], 2), Segment([3, 4], 1)])]
    assert got[1] == [Segment([9, 9, 9, 9], 2), Segment([1, 5, 6, 4], 1)]


def test_prompt_prefix_is_the_template_preamble() -> None:
    tok = Bytes()
    prefix = prompt_prefix(tok, "llamafactory-0.5.3", 512)
    text, prompt = tok.decode(prefix), alpaca_prompt("Q?", "", "llamafactory-0.5.3")
    assert prefix[0] == tok.bos_id and text.startswith("Below is an instruction")
    # bytes: the two probe prompts agree up to the newline before the question; one token short of that
    assert len(text) == prompt.index("Q?") - 1 and alpaca_prompt("Other?", "some input").startswith(text)


def test_shared_rows_hold_every_example_once_with_the_preamble_once_per_row() -> None:
    recs = qa(24)
    tok = Bytes()
    shared = list(make_dataset(recs, tok, _cfg(share_prompt_prefix=True, batch_size=4)))
    plain = list(make_dataset(recs, tok, _cfg(batch_size=4)))
    assert all(isinstance(b, SharedPrefixBatch) for b in shared) and all(isinstance(b, SeqBatch) for b in plain)
    prefix = prompt_prefix(tok, "llamafactory-0.5.3", 512)
    texts = []
    for b in shared:
        ids, seg, grp, mask = b.seq.input_ids, b.seq.segment_ids, b.group_ids, b.seq.loss_mask
        for r in range(ids.shape[0]):
            head = ids[r][(seg[r] == 0) & (grp[r] > 0)]
            assert len(head) in (0, len(prefix)) and (len(head) == 0 or tuple(head) == prefix)
            for s in range(1, int(seg[r].max()) + 1):
                sel = seg[r] == s
                texts.append(tok.decode(np.concatenate([head, ids[r][sel]])))
                assert tok.decode(np.roll(ids[r], -1)[sel & (mask[r] > 0)]) != ""  # the answer is scored
    assert sorted(texts) == sorted(alpaca_prompt(r.question, r.input) + r.answer for r in recs)
    tokens = lambda bs, f: sum(int((f(b) > 0).sum()) for b in bs)
    assert tokens(shared, lambda b: b.group_ids) < 0.7 * tokens(plain, lambda b: b.segment_ids)
    assert len(shared) < len(plain)  # more examples per row


def test_share_prompt_prefix_needs_packing() -> None:
    with pytest.raises(ConfigError, match=r"share_prompt_prefix needs data\.pack"):
        DataConfig(share_prompt_prefix=True, pack=False)


@pytest.mark.slow
def test_loss_and_gradients_equal_the_plain_layout_on_meshes(mesh) -> None:
    recs = [*qa(20, seed=1), QARecord("An odd question with input", "Its answer.", input="some input")]
    shared = list(make_dataset(recs, Bytes(), _cfg(share_prompt_prefix=True)))
    plain = list(make_dataset(recs, Bytes(), _cfg()))
    assert len(shared) == len(plain) == 1  # every example in one batch either way: the same token-mean loss
    assert int(shared[0].group_ids.max()) >= 1 and shared[0].seq.input_ids.shape == plain[0].input_ids.shape
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    ts = create_state(_place(_tiny_model(), mesh), tx, mesh)
    step = make_eval_step(ts, make_sft_loss(64))
    got = jax.device_get(step(ts.params, ts.frozen, to_device(stack_micro(shared), mesh)))
    want = jax.device_get(step(ts.params, ts.frozen, to_device(stack_micro(plain), mesh)))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert got["tokens"] < 0.6 * want["tokens"]
    model = _tiny_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad = jax.jit(jax.grad(lambda p, b: sft_loss(nnx.merge(graphdef, p, rest), b, chunk_size=64)[0]))
    for a, b in zip(jax.tree.leaves(grad(params, jax.tree.map(np.asarray, shared[0]))),
                    jax.tree.leaves(grad(params, jax.tree.map(np.asarray, plain[0]))), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
