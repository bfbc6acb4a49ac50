"""A DDSketch-style quantile sketch over numpy: log-spaced buckets, exactly mergeable.

Every positive value v falls in bucket ``ceil(log(v) / log(gamma))`` with
``gamma = (1 + alpha) / (1 - alpha)``; a bucket's representative value
``2 * gamma**i / (gamma + 1)`` is within relative error ``alpha`` of every value
in it. Negative values use mirrored buckets and zero has its own. With
``ALPHA = 0.01`` any quantile answer is within 1 % (relative) of a value whose
rank is the requested rank (the rank is the exact ``ceil(q * n)``-th value, the
"lower" definition used by ``numpy.quantile(method="inverted_cdf")``).

The sketch state of a group is a set of ``(bucket, count)`` pairs, so merging
two sketches is adding counts per bucket: merge is exact and order-free.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ALPHA", "bucket_of", "value_of", "quantiles"]

ALPHA = 0.01
_GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = np.log(_GAMMA)
# Values below this magnitude share the zero bucket (1e-9 of any unit).
_MIN_MAGNITUDE = 1e-9
# Bucket indices are offset so that negative values map below zero:
# index > 0 positive, index < 0 negative, 0 the zero bucket.
_OFFSET = int(np.ceil(np.log(_MIN_MAGNITUDE) / _LOG_GAMMA)) - 1


def bucket_of(values: np.ndarray) -> np.ndarray:
    """Map finite float64 values to signed int64 bucket ids (monotonic in value)."""
    v = np.asarray(values, dtype=np.float64)
    mag = np.abs(v)
    out = np.zeros(v.shape, dtype=np.int64)
    big = mag >= _MIN_MAGNITUDE
    idx = np.ceil(np.log(mag[big]) / _LOG_GAMMA).astype(np.int64) - _OFFSET
    out[big] = np.where(v[big] > 0, idx, -idx)
    return out


def value_of(buckets: np.ndarray) -> np.ndarray:
    """Representative value of each bucket id (inverse of ``bucket_of`` within ALPHA)."""
    b = np.asarray(buckets, dtype=np.int64)
    mag = np.abs(b) + _OFFSET
    rep = 2.0 * np.power(_GAMMA, mag.astype(np.float64)) / (_GAMMA + 1.0)
    return np.where(b == 0, 0.0, np.sign(b) * rep)


def quantiles(groups: np.ndarray, buckets: np.ndarray, counts: np.ndarray, n_groups: int, q: float) -> np.ndarray:
    """Quantile ``q`` per group from ``(group, bucket, count)`` rows; NaN for empty groups.

    ``groups`` are dense ids in ``[0, n_groups)``. Rows may repeat a (group, bucket)
    pair (unmerged partials); they are summed.
    """
    out = np.full(n_groups, np.nan)
    if len(groups) == 0:
        return out
    order = np.lexsort((buckets, groups))
    g, b, c = groups[order], buckets[order], counts[order].astype(np.int64)
    totals = np.bincount(g, weights=c, minlength=n_groups).astype(np.int64)
    # rank (1-based) of the wanted value in each group: ceil(q * n), at least 1
    rank = np.maximum(1, np.ceil(q * totals - 1e-9).astype(np.int64))
    cum = np.cumsum(c)
    group_base = np.concatenate(([0], np.cumsum(totals)))[:-1]
    has = totals > 0
    target = group_base[has] + rank[has]
    pos = np.searchsorted(cum, target, side="left")
    out[has] = value_of(b[pos])
    return out
