"""The masking tests run once per pre-filter engine: Hyperscan (when it imports) and the
pure-Python fallback used on platforms without a wheel. Both must give the same bytes and
records as the patterns alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bastion.masking import stream

ENGINES = ("hyperscan", "python")


@pytest.fixture(scope="module", params=ENGINES)
def prefilter_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Sets bastion.masking.stream.HYPERSCAN for the maskers a test module builds.

    Module scope: hypothesis refuses function-scoped fixtures, and the flag is read when a
    masker is built, so a whole module runs with one engine, then with the other.
    """
    if request.param == "hyperscan" and stream.hyperscan is None:
        pytest.skip("hyperscan is not installed (no wheel for this platform)")
    saved = stream.HYPERSCAN
    stream.HYPERSCAN = request.param == "hyperscan"
    try:
        yield request.param
    finally:
        stream.HYPERSCAN = saved
