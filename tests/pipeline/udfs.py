"""User aggregation functions used by the tests (``module:function`` in a spec)."""

import pyarrow as pa
import pyarrow.compute as pc


def spread(values: pa.Array) -> float:
    """max - min of a window's values."""
    mm = pc.min_max(values)
    return mm["max"].as_py() - mm["min"].as_py()


def fragile(values: pa.Array) -> float:
    """Sum, but raises for a window holding a value of 13 (a user function with a bug)."""
    if 13.0 in values.to_pylist():
        raise ValueError("unlucky window")
    return float(pc.sum(values).as_py() or 0.0)
