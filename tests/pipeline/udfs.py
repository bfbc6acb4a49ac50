"""User aggregation functions used by the tests (``module:function`` in a spec)."""

import pyarrow as pa
import pyarrow.compute as pc


def spread(values: pa.Array) -> float:
    """max - min of a window's values."""
    mm = pc.min_max(values)
    return mm["max"].as_py() - mm["min"].as_py()
