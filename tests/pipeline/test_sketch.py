"""The quantile sketch: relative error within 1 % and exact merges."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline import sketch

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 400), elements=finite), st.sampled_from([0.01, 0.5, 0.9, 0.95, 0.99]))
def test_quantile_within_alpha_of_exact_rank(values, q):
    b = sketch.bucket_of(values)
    est = sketch.quantiles(np.zeros(len(values), np.int64), b, np.ones(len(values)), 1, q)[0]
    exact = np.quantile(values, q, method="inverted_cdf")
    if abs(exact) < 1e-9:
        assert abs(est) < 1e-9 * 1.02
    else:
        assert abs(est - exact) <= sketch.ALPHA * abs(exact) * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(2, 300), elements=finite), st.integers(1, 299))
def test_merge_of_partial_sketches_equals_sketch_of_all(values, cut):
    cut = min(cut, len(values) - 1)
    b = sketch.bucket_of(values)
    whole = sketch.quantiles(np.zeros(len(b), np.int64), b, np.ones(len(b)), 1, 0.9)
    # two partial states: (bucket, count) pairs of each half, concatenated
    parts = []
    for half in (b[:cut], b[cut:]):
        u, c = np.unique(half, return_counts=True)
        parts.append((u, c))
    mb = np.concatenate([p[0] for p in parts])
    mc = np.concatenate([p[1] for p in parts])
    merged = sketch.quantiles(np.zeros(len(mb), np.int64), mb, mc, 1, 0.9)
    assert merged[0] == whole[0]
