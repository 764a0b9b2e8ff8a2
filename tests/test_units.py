"""recorder/units.py: the one byte-count formatter of messages, the CLI and the console."""

from __future__ import annotations

from recorder.units import human_size


def test_one_size_formatter_reads_as_before() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536, 2**20, 3 * 2**30, 2**42)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "1.0 MiB", "3.0 GiB", "4096.0 GiB"]
    assert human_size(None, sep="") == "0B" and human_size(2048, sep="") == "2.0KiB"
    assert human_size(12, byte_unit="bytes") == "12 bytes"
