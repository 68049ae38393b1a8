"""Sampling: the empirical distribution of many draws matches the truncated softmax computed in float64."""
import math

import numpy as np
import pytest
import torch

from flashgen.engine.sampling import Sampler, SamplingParams

N_DRAWS = 40000


def expected_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The truncated softmax of one logits vector, in float64 and plain numpy (the oracle)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    keep = np.ones_like(z, dtype=bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        p[order[before >= top_p]] = 0
        p /= p.sum()
    if min_p > 0:
        p[p < min_p * p.max()] = 0
        p /= p.sum()
    return p


def chi_square_bound(df, z=4.75):
    """Wilson-Hilferty quantile of chi-square(df) at the upper tail probability ~1e-6 (z = 4.75)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def draws(logits, **kw):
    """N_DRAWS samples of the same logits row, as a batch (also exercises batched sampling)."""
    params = SamplingParams(**{"top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw})
    sampler = Sampler(params, [[]] * N_DRAWS, logits.numel())
    tokens, _ = sampler(logits.expand(N_DRAWS, -1).contiguous())
    return tokens


def distinct_logits(v):
    # Well-separated values: ties at a truncation boundary make top_k ambiguous.
    return torch.randperm(v).float() * 0.37 / math.sqrt(v) * 4 - 3


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=0.9, top_k=12, top_p=0.9, min_p=0.05),
    ],
)
def test_empirical_distribution_matches_truncated_softmax(kw):
    logits = distinct_logits(23)
    expected = expected_distribution(logits.numpy(), **kw)
    counts = np.bincount(draws(logits, **kw).numpy(), minlength=logits.numel())
    assert counts[expected == 0].sum() == 0, "a truncated token was sampled"
    support = expected > 0
    e = expected[support] * N_DRAWS
    chi2 = ((counts[support] - e) ** 2 / e).sum()
    df = max(int(support.sum()) - 1, 1)
    assert chi2 < chi_square_bound(df), f"chi2 {chi2:.1f} over {df} degrees of freedom"
    tv = 0.5 * np.abs(counts / N_DRAWS - expected).sum()
    assert tv < 0.03


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    tokens = draws(logits, top_p=0.6)
    assert set(tokens.unique().tolist()) == {0, 1}


def test_greedy_is_argmax_and_ignores_the_seed():
    logits = torch.randn(5, 1000)
    for seed in (None, 1, 2):
        tokens, _ = Sampler(SamplingParams(temperature=0, seed=seed), [[]] * 5, 1000)(logits)
        assert torch.equal(tokens, logits.argmax(-1))


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(3, 500)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=1234)

    def run(p):
        sampler = Sampler(p, [[]] * 3, 500)
        return torch.stack([sampler(logits)[0] for _ in range(20)])

    assert torch.equal(run(params), run(params))
    other = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=4321)
    assert not torch.equal(run(params), run(other))


def test_repetition_penalty_on_prompt_and_output_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), [[0, 1]], 4)
    # Prompt tokens 0 (positive logit, divided) and 1 (negative, multiplied); 3 is the argmax.
    assert sampler(logits)[0].item() == 3
    # Now 3 was generated too: token 3 -> 1.5, token 0 -> 1.0, token 2 -> 0.5.
    assert sampler(logits)[0].item() == 3
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=4.0), [[]], 4)
    assert sampler(logits)[0].item() == 3
    assert sampler(logits)[0].item() == 0  # 3.0 / 4 = 0.75 < 2.0


def test_presence_and_frequency_penalties_count_output_tokens():
    logits = torch.tensor([[1.0, 0.92, 0.0]])
    params = SamplingParams(temperature=0, presence_penalty=0.05, frequency_penalty=0.1)
    sampler = Sampler(params, [[0]], 3)  # prompt tokens are not penalized by presence/frequency
    got = [sampler(logits)[0].item() for _ in range(4)]
    # one 0: 0.85 < 0.92 -> 1; one 1: 0.77 < 0.85 -> 0; two 0s: 0.75 < 0.77 -> 1
    assert got == [0, 1, 0, 1]
    assert sampler.output_counts[0].tolist() == [2.0, 2.0, 0.0]


def test_logprobs_are_of_the_unprocessed_distribution():
    logits = torch.randn(4, 300)
    tokens, lp = Sampler(SamplingParams(temperature=0.5, seed=0), [[]] * 4, 300, logprobs=True)(logits)
    want = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kw, name",
    [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-3), "top_k"),
     (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty")],
)
def test_bad_parameters_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)
