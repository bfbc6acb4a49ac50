"""shortfalls: a bounded run is complete only when every partition reached its end offset."""

from __future__ import annotations

import pytest

from pipeline.driver import shortfalls


@pytest.mark.parametrize("workers, end, problems", [
    ([{"positions": {0: 10, 1: 5}}], {0: 10, 1: 5}, []),
    ([{"positions": {0: 12}}, {"positions": {1: 5}}], {0: 10, 1: 5}, []),  # past the end (a whole fetched batch)
    ([{"positions": {0: 10}}], {0: 10, 1: 5}, ["partition 1 was owned by no worker (end offset 5)"]),
    ([{"positions": {0: 10, 1: 2}}], {0: 10, 1: 5}, ["partition 1 stopped at offset 2, 3 records short of its end offset 5"]),
    ([{"positions": {"1": 2}}, {"positions": {1: 5}}], {1: 5}, []),  # a replaced worker's older report does not count
    ([], {}, []),
])
def test_shortfalls(workers, end, problems):
    assert shortfalls(workers, end) == problems
