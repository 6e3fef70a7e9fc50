"""Sampling: each option measured for what it must do."""

import math

import numpy as np
import pytest

from rwkvcpu.errors import InvalidArgumentError, RwkvCpuError
from rwkvcpu.sampling import (SamplingParams, Sampler, apply_penalties, apply_repetition_penalty,
                              kept_tokens, make_params, softmax)


def random_logits(V, seed):
    return np.random.default_rng(seed).normal(scale=3.0, size=V).astype(np.float32)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("options, message", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 0}, "top_p must be > 0"),
    ({"top_p": 1.01}, "top_p must be <= 1"),
    ({"top_p": -1}, "top_p must be > 0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"min_p": 1.5}, "min_p must be <= 1"),
    ({"penalty_decay": 1.5}, "penalty_decay must be <= 1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"max_tokens": -5}, "max_tokens must be >= 0"),
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"banned_tokens": [-3]}, "banned token id must be >= 0"),
    ({"logit_bias": {5: float("inf")}}, "logit_bias\\[5\\] must be a finite"),
    ({"logit_bias": [1, 2]}, "logit_bias must map"),
    ({"temprature": 1}, "unknown sampling option 'temprature'"),
])
def test_bad_values_raise_our_error(options, message):
    with pytest.raises(InvalidArgumentError, match=message) as e:
        make_params(**options)
    assert isinstance(e.value, RwkvCpuError) and isinstance(e.value, ValueError)


def test_good_values_are_normalised():
    p = make_params(temperature=0, top_p=1, top_k=np.int64(5), stop="\n\n", logit_bias={3: -np.inf},
                    seed=np.uint32(7), max_tokens=None)
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.top_k == 5 and type(p.top_k) is int
    assert p.stop == ("\n\n",)
    assert p.logit_bias == {3: -math.inf}
    assert p.seed == 7 and p.max_tokens is None
    assert p.replace(top_p=0.5).top_p == 0.5 and p.top_p == 1.0


def test_token_ids_are_checked_against_the_vocabulary():
    with pytest.raises(InvalidArgumentError, match="banned token id 300 is outside"):
        Sampler(SamplingParams(banned_tokens=[300]), 256)
    with pytest.raises(InvalidArgumentError, match="every token is banned"):
        Sampler(SamplingParams(banned_tokens=range(4)), 4)


# ---------------------------------------------------------------- filters

def _order(logits):
    """Most probable first, ties by lower id: the order every filter keeps a run of."""
    return np.lexsort((np.arange(logits.shape[0]), -logits))


def _probs_logits(V, seed, scale=3.0):
    logits = random_logits(V, seed).astype(np.float64) * scale / 3.0
    return softmax(logits), logits


@pytest.mark.parametrize("V", [50, 4000, 65536])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.85, 0.99])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(V, p, scale):
    probs, logits = _probs_logits(V, V, scale)
    kept = kept_tokens(logits, 0, p, 0.0)
    n = len(kept)
    order = _order(logits)
    # the n most probable tokens
    assert set(kept) == set(order[:n]) and len(set(kept)) == n
    # their mass reaches p, and one token fewer would not
    assert probs[order[:n]].sum() >= p - 1e-12
    assert probs[order[:n - 1]].sum() < p


def test_top_p_one_keeps_everything():
    assert kept_tokens(np.zeros(10), 0, 1.0, 0.0) is None


@pytest.mark.parametrize("k", [1, 5, 40, 1000])
def test_top_k_keeps_the_k_most_probable(k):
    _, logits = _probs_logits(3000, 1)
    kept = kept_tokens(logits, k, 1.0, 0.0)
    assert len(kept) == k and set(kept) == set(np.argsort(-logits)[:k])


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    probs, logits = _probs_logits(3000, 2)
    kept = kept_tokens(logits, 0, 1.0, 0.05)
    assert set(kept) == set(np.nonzero(probs >= 0.05 * probs.max())[0])


def test_filters_intersect():
    _, logits = _probs_logits(2000, 3)
    a = set(kept_tokens(logits, 30, 1.0, 0.0))
    b = set(kept_tokens(logits, 0, 0.9, 0.0))
    c = set(kept_tokens(logits, 0, 1.0, 0.01))
    assert set(kept_tokens(logits, 30, 0.9, 0.01)) == a & b & c


def test_ties_resolve_to_lower_ids_and_banned_tokens_are_last():
    logits = np.zeros(10)
    logits[[2, 5]] = -np.inf
    assert sorted(kept_tokens(logits, 3, 1.0, 0.0)) == [0, 1, 3]
    assert sorted(kept_tokens(logits, 0, 0.5, 0.0)) == [0, 1, 3, 4]   # 4 of 8 equal tokens reach 0.5
    assert sorted(kept_tokens(logits, 9, 1.0, 0.0)) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_samples_only_come_from_the_kept_set():
    logits = random_logits(500, 4)
    kept = set(kept_tokens(logits.astype(np.float64), 0, 0.5, 0.0))
    s = Sampler(SamplingParams(top_p=0.5, presence_penalty=0, frequency_penalty=0, seed=0), 500)
    drawn = {s.sample(logits) for _ in range(2000)}
    assert drawn <= kept
    assert len(drawn) == len(kept)     # and every kept token can come out


# ---------------------------------------------------------------- temperature

def test_temperature_zero_is_greedy():
    logits = random_logits(1000, 5)
    s = Sampler(SamplingParams(temperature=0, top_p=0.01, top_k=3, seed=1), 1000)
    assert {s.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(T):
    logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    s = Sampler(SamplingParams(temperature=T, top_p=1.0, presence_penalty=0, frequency_penalty=0, seed=3), 4)
    n = 40000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=4) / n
    expected = softmax(logits.astype(np.float64) / T)
    # standard error of a frequency is at most 0.0025 here; 4 sigma
    assert np.abs(counts - expected).max() < 0.01


def test_temperature_applies_after_filtering():
    # top-p 0.6 on [0.5, 0.3, 0.2] keeps the first two; at T=2 they are drawn as softmax(l/2) of those two
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    s = Sampler(SamplingParams(temperature=2.0, top_p=0.6, presence_penalty=0, frequency_penalty=0, seed=4), 3)
    n = 20000
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=3) / n
    w = np.exp(logits[:2] / 2)
    assert counts[2] == 0
    assert abs(counts[0] - w[0] / w.sum()) < 0.015


# ---------------------------------------------------------------- penalties

def test_presence_and_frequency_penalties_with_decay_lower_the_right_logits_by_the_right_amount():
    V, a, b = 10, 3, 7
    presence, frequency, decay = 0.4, 0.25, 0.9
    s = Sampler(SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                               penalty_decay=decay), V)
    for t in (a, b, a):
        s.accept(t)
    logits = np.linspace(-1, 1, V).astype(np.float32)
    out = s.adjusted_logits(logits)
    # a: counted at steps 1 and 3 -> decay^2 + 1; b: counted at step 2 -> decay
    expected = logits.astype(np.float64).copy()
    expected[a] -= presence + frequency * (decay ** 2 + 1)
    expected[b] -= presence + frequency * decay
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_penalty_matches_chatrwkv_loop():
    # ChatRWKV: for n in occurrence: out[n] -= presence + occurrence[n] * frequency;
    # then each step: occurrence *= decay; occurrence[token] += 1
    rng = np.random.default_rng(0)
    V, presence, frequency, decay = 50, 0.3, 0.6, 0.996
    s = Sampler(SamplingParams(presence_penalty=presence, frequency_penalty=frequency, penalty_decay=decay), V)
    occurrence = {}
    for _ in range(40):
        logits = rng.normal(size=V)
        ref = logits.copy()
        for n in occurrence:
            ref[n] -= presence + occurrence[n] * frequency
        np.testing.assert_allclose(s.adjusted_logits(logits), ref, atol=1e-12)
        token = int(rng.integers(V // 5))
        for n in occurrence:
            occurrence[n] *= decay
        occurrence[token] = occurrence.get(token, 0) + 1
        s.accept(token)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_in_context():
    V = 6
    s = Sampler(SamplingParams(repetition_penalty=2.0, presence_penalty=0, frequency_penalty=0), V)
    s.observe([0, 1])      # prompt tokens
    s.accept(2)            # a generated token
    logits = np.array([3.0, -3.0, 1.0, 3.0, -3.0, 0.5])
    np.testing.assert_allclose(s.adjusted_logits(logits), [1.5, -6.0, 0.5, 3.0, -3.0, 0.5])


def test_logit_bias_adds_exactly_and_bans_never_come_out():
    V = 8
    logits = np.zeros(V, np.float32)
    s = Sampler(SamplingParams(logit_bias={2: 1.5, 5: -0.5}, banned_tokens=[0, 1], seed=0), V)
    out = s.adjusted_logits(logits)
    assert out[2] == 1.5 and out[5] == -0.5 and out[3] == 0.0
    assert np.isneginf(out[0]) and np.isneginf(out[1])
    s = Sampler(SamplingParams(banned_tokens=[0, 1], top_p=1.0, seed=0), V)
    assert not {s.sample(logits) for _ in range(500)} & {0, 1}


def test_greedy_respects_bans_and_bias():
    logits = np.array([5.0, 4.0, 3.0])
    assert Sampler(SamplingParams(temperature=0, banned_tokens=[0]), 3).sample(logits) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias={2: 2.5}), 3).sample(logits) == 2


def test_everything_banned_at_runtime_is_a_clear_error():
    s = Sampler(SamplingParams(logit_bias={0: -math.inf, 1: -math.inf}), 2)
    with pytest.raises(InvalidArgumentError, match="no token can be generated"):
        s.sample(np.zeros(2))


def test_helpers_do_nothing_when_off():
    x = np.array([1.0, -1.0])
    apply_penalties(x, np.array([0, 1]), np.ones(2), 0.0, 0.0)
    apply_repetition_penalty(x, np.ones(2, bool), 1.0)
    assert list(x) == [1.0, -1.0]


# ---------------------------------------------------------------- seed

def _draws(seed, n=200, V=300):
    s = Sampler(SamplingParams(seed=seed, top_p=0.95), V)
    out = []
    for i in range(n):
        t = s.sample(random_logits(V, i))
        s.accept(t)
        out.append(t)
    return out


def test_the_seed_reproduces():
    assert _draws(42) == _draws(42)
    assert _draws(42) != _draws(43)


@pytest.mark.parametrize("options, field, message", [
    (dict(top_p=0), "top_p", "top_p must be > 0 (top_p is in (0, 1]; 1 turns it off), got 0"),
    (dict(banned_tokens=[-3]), "banned token id", "banned token id must be >= 0, got -3"),
    (dict(logit_bias={5: float("inf")}), "logit_bias[5]", "logit_bias[5] must be a finite number, got inf"),
    (dict(stop=[""]), "stop strings", "stop strings must be non-empty strings, got ''"),
])
def test_errors_name_the_value_by_the_apis_words(options, field, message):
    """The library speaks its own words; `field` lets a front end (the CLI) reword them."""
    with pytest.raises(InvalidArgumentError) as e:
        make_params(**options)
    assert str(e.value) == message and e.value.field == field
