"""recorder/secretfile.py: the one writer of secrets (keys, the masking key, tokens)."""

from __future__ import annotations

import stat
from pathlib import Path

from recorder.secretfile import write_secret


def test_a_secret_is_0600_complete_and_the_first_writer_wins(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "key.pem"
    assert write_secret(path, b"first") is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"first"
    assert write_secret(path, b"second") is False  # created by someone else first: kept
    assert path.read_bytes() == b"first"
    assert write_secret(path, b"refreshed", replace=True) is True
    assert path.read_bytes() == b"refreshed" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.pem"]  # no temporary file left
