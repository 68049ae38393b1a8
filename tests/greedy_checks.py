"""Comparing greedy generations of two code paths whose float32 sums differ in order."""


def assert_same_greedy(want, got):
    """Equal greedy tokens (Completions from generate(..., logprobs=2)); where the other summation order breaks
    a near tie (both candidates within 1e-4 in want's log-probabilities), the sequences may part there."""
    for w, g in zip(want, got, strict=True):
        for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids, strict=True)):
            if a != b:
                top = w.top_logprobs[i]
                assert b in top and abs(top[a] - top[b]) < 1e-4, f"token {i}: {a} vs {b} is no near tie ({top})"
                break
