"""KV-cache generation: greedy parity with HF generate, padding, EOS, meshes, top-k/top-p, seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kt_jax.data.packing import bucket_length
from kt_jax.errors import ConfigError
from kt_jax.inference.sampling import MIN_BUCKET, SamplingConfig, filter_logits, generate, generate_ids, next_tokens
from kt_jax.model.hf import load_pretrained

# Built against HF PyTorch: skipped where torch is not installed (the Python 3.12 CI run).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TopKLogitsWarper, TopPLogitsWarper = transformers.TopKLogitsWarper, transformers.TopPLogitsWarper

LENGTHS = (5, 13, 18, 2)  # 18 > 16: the batch spans two prompt buckets when split


def _prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=n).tolist() for n in lengths]


def _hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy_each(hf, prompts, n: int, eos: int | None = None) -> list[list[int]]:
    """HF greedy, one unpadded prompt at a time (the exact reference), cut after EOS."""
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
        new = ids[0, len(p):].tolist()
        out.append(new[: new.index(eos) + 1] if eos is not None and eos in new else new)
    return out


@pytest.mark.parametrize("which", ["llama2_dir", "llama3_dir"])
def test_greedy_single_prompt_equals_hf(which, request) -> None:
    path = request.getfixturevalue(which)
    prompt = _prompts((9,), seed=5)
    ours = generate_ids(load_pretrained(path), prompt, SamplingConfig.greedy(24))
    ref = _hf_greedy_each(_hf(path), prompt, 24)
    assert len(set(ref[0])) > 3, "degenerate reference"
    assert ours == ref


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_greedy_mixed_lengths_equals_hf(llama3_dir, padding_side) -> None:
    prompts = _prompts()
    hf = _hf(llama3_dir)
    ref = _hf_greedy_each(hf, prompts, 20)
    ours = generate_ids(load_pretrained(llama3_dir), prompts, SamplingConfig.greedy(20), padding_side=padding_side,
                        batch_size=4)
    assert ours == ref
    chunked = generate_ids(load_pretrained(llama3_dir), prompts, SamplingConfig.greedy(20),
                           padding_side=padding_side, batch_size=4, prefill_chunk=5)  # 32 = 5+5+...+2
    assert chunked == ref
    # HF batched left-padded generate gives the same tokens as well
    width = max(LENGTHS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, width:].tolist()
    assert ours == batched


def test_eos_stops_each_row_like_hf(llama2_dir) -> None:
    prompts = _prompts(seed=2)
    model, hf = load_pretrained(llama2_dir), _hf(llama2_dir)
    free = generate_ids(model, prompts, SamplingConfig.greedy(16))
    eos = free[0][4]  # a token row 0 emits mid-way
    ours = generate_ids(model, prompts, SamplingConfig.greedy(16), eos_ids=[eos], pad_id=0)
    ref = _hf_greedy_each(hf, prompts, 16, eos=eos)
    assert ours == ref
    assert ours[0][-1] == eos and len(ours[0]) <= 5
    assert any(len(r) == 16 for r in ours) or all(r[-1] == eos for r in ours)


def test_sharded_generation_equals_unsharded(llama3_dir, mesh) -> None:
    prompts = _prompts(seed=3)
    ref = generate_ids(load_pretrained(llama3_dir), prompts, SamplingConfig.greedy(12))
    sharded = load_pretrained(llama3_dir, mesh=mesh)
    assert generate_ids(sharded, prompts, SamplingConfig.greedy(12), mesh=mesh, batch_size=3) == ref
    sampling = SamplingConfig.knowtuning(12)
    assert generate_ids(sharded, prompts, sampling, mesh=mesh, seed=5) == generate_ids(
        load_pretrained(llama3_dir), prompts, sampling, seed=5
    )


def test_same_seed_same_tokens_independent_of_batching(llama2_dir) -> None:
    model, prompts = load_pretrained(llama2_dir), _prompts(seed=4)
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.3)
    a = generate_ids(model, prompts, sampling, seed=7, batch_size=4)
    b = generate_ids(model, prompts, sampling, seed=7, batch_size=1)
    c = generate_ids(model, prompts, sampling, seed=8, batch_size=4)
    assert a == b
    assert a != c


def _random_logits(batch: int = 6, vocab: int = 300, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * 3).astype(np.float32)


@pytest.mark.parametrize(("top_k", "top_p", "temperature"), [(50, 1.0, 1.0), (0, 0.7, 1.0), (50, 0.7, 0.95),
                                                             (7, 0.3, 2.0)])
def test_filter_matches_hf_warpers(top_k, top_p, temperature) -> None:
    logits = _random_logits()
    ours = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(top_k=top_k, top_p=top_p,
                                                                         temperature=temperature)))
    ref = torch.tensor(logits) / temperature
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
    finite = ~np.isinf(ours)
    np.testing.assert_allclose(ours[finite], ref.numpy()[finite], rtol=1e-6)


def _draws(logits: np.ndarray, sampling: SamplingConfig, n: int = 400) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(0), n * logits.shape[0]).reshape(n, logits.shape[0], -1)
    draw = jax.jit(jax.vmap(lambda k: next_tokens(jnp.asarray(logits), k, sampling)))
    return np.asarray(draw(keys))  # [n, B]


def test_top_k_never_emits_outside_top_k() -> None:
    logits = _random_logits(seed=1)
    draws = _draws(logits, SamplingConfig(top_k=5, temperature=3.0))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    for row in range(logits.shape[0]):
        assert set(draws[:, row]) <= set(top5[row])
        assert len(set(draws[:, row])) > 2  # high temperature: several of the five are drawn


def test_top_p_respects_the_mass() -> None:
    logits = _random_logits(seed=2)
    top_p = 0.6
    draws = _draws(logits, SamplingConfig(top_p=top_p))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row in range(logits.shape[0]):
        order = np.argsort(-probs[row])
        mass = np.cumsum(probs[row, order])
        k = int(np.searchsorted(mass, top_p) + 1)  # smallest prefix with mass >= top_p
        allowed = set(order[:k])
        assert mass[k - 1] >= top_p and (k == 1 or mass[k - 2] < top_p)
        assert set(draws[:, row]) <= allowed
        if k > 1:
            assert len(set(draws[:, row])) > 1


def test_knowtuning_draws_follow_the_hf_filtered_distribution() -> None:
    """The top-k fast path (top-p among the k candidates) samples HF's temperature/top-k/top-p distribution."""
    logits = _random_logits(batch=3, seed=4) / 2
    sampling = SamplingConfig.knowtuning()
    ref = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(50)(None, torch.tensor(logits) / 0.95))
    probs = torch.softmax(ref, dim=-1).numpy()
    draws = _draws(logits, sampling, n=3000)
    for row in range(logits.shape[0]):
        assert set(draws[:, row]) <= set(np.flatnonzero(probs[row] > 0))
        freq = np.bincount(draws[:, row], minlength=logits.shape[1]) / draws.shape[0]
        assert np.abs(freq - probs[row]).max() < 0.03
        assert (probs[row] > 0).sum() > 2


def test_greedy_when_temperature_zero_and_presets() -> None:
    logits = _random_logits(seed=3)
    keys = jax.random.split(jax.random.PRNGKey(0), logits.shape[0])
    np.testing.assert_array_equal(np.asarray(next_tokens(jnp.asarray(logits), keys, SamplingConfig(temperature=0.0))),
                                  logits.argmax(1))
    kt = SamplingConfig.knowtuning()
    assert (kt.temperature, kt.top_p, kt.top_k, kt.max_new_tokens, kt.do_sample) == (0.95, 0.7, 50, 512, True)
    assert SamplingConfig.preset("greedy", 8) == SamplingConfig.greedy(8)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="preset"):
        SamplingConfig.preset("beam")
    assert [bucket_length(n, smallest=MIN_BUCKET) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [bucket_length(n, 48, smallest=MIN_BUCKET) for n in (1, 17, 40, 48)] == [16, 32, 48, 48]  # capped


class _ByteTokenizer:
    """Bytes 3..255 as tokens; BOS 1, EOS 2, PAD 0 (the Tokenizer protocol, for the text wrapper)."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

    def encode(self, text: str) -> list[int]:
        return [max(3, b) for b in text.encode("latin-1")]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i >= 3).decode("latin-1")


def test_text_wrapper_adds_bos_and_stops_at_eos(llama2_dir) -> None:
    tok, model = _ByteTokenizer(), load_pretrained(llama2_dir)
    prompts = ["Instruction: say hi\n", "Q?"]
    texts = generate(model, tok, prompts, SamplingConfig.greedy(10))
    ids = generate_ids(model, [[1, *tok.encode(p)] for p in prompts], SamplingConfig.greedy(10), eos_ids=[2])
    assert texts == [tok.decode([t for t in row if t != 2]) for row in ids]
    assert all(isinstance(t, str) for t in texts)


def test_bfloat16_compute_generates_with_a_bf16_cache(llama2_dir) -> None:
    model = load_pretrained(llama2_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert model.init_cache(2, 8).k[0].dtype == jnp.bfloat16
    out = generate_ids(model, _prompts(seed=5), SamplingConfig.greedy(8))
    ref = generate_ids(load_pretrained(llama2_dir), _prompts(seed=5), SamplingConfig.greedy(8))
    assert all(len(r) == 8 and all(0 <= t < 256 for t in r) for r in out)
    assert sum(a[0] == b[0] for a, b in zip(out, ref, strict=True)) >= 3  # first tokens mostly agree with float32
