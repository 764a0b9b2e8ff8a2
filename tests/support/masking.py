"""The masking tests run once per engine: the compiled engine (bastion/masking/_engine.c,
when it is built), the Python masker with the Hyperscan pre-filter (when it imports), and
the pure-Python masker used where neither is available. All must give the same bytes and
records as the patterns alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bastion.masking import engine, stream

ENGINES = ("compiled", "hyperscan", "python")


@pytest.fixture(scope="module", params=ENGINES)
def prefilter_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Sets the engine flags (stream.HYPERSCAN, engine.ENABLED) for the maskers a test
    module builds.

    Module scope: hypothesis refuses function-scoped fixtures, and the flags are read when a
    masker is built, so a whole module runs with one engine, then with the next.
    """
    if request.param == "hyperscan" and stream.hyperscan is None:
        pytest.skip("hyperscan is not installed (no wheel for this platform)")
    if request.param == "compiled" and engine._engine is None:
        pytest.skip("the compiled masking engine is not built (no C compiler or OpenSSL headers)")
    saved = stream.HYPERSCAN, engine.ENABLED
    stream.HYPERSCAN = request.param == "hyperscan"
    engine.ENABLED = request.param == "compiled"
    try:
        yield request.param
    finally:
        stream.HYPERSCAN, engine.ENABLED = saved


def feed_in_pieces(masker: stream.StreamMasker, data: bytes, cuts: list[int]) -> tuple[list[bytes], list]:
    """Feed ``data`` cut at ``cuts``, then flush: every output (the flush's last) and every
    record. Checks the held tail's bound after each feed."""
    outs, found, prev = [], [], 0
    for c in [*cuts, len(data)]:
        out, f = masker.feed(data[prev:c])
        outs.append(out)
        found += f
        prev = c
        assert masker.held <= masker.hold_limit
    out, f = masker.flush()
    outs.append(out)
    return outs, found + f
