"""How a byte count reads in messages, the CLI and the console (one formatter for all)."""

from __future__ import annotations


def human_size(n: int | float | None, sep: str = " ", byte_unit: str = "B") -> str:
    """``512 B``, ``1.5 KiB``, ``3.0 GiB`` (GiB is the largest unit); ``sep`` goes between
    the number and the unit, ``byte_unit`` names single bytes (``bytes`` in sentences)."""
    value = float(n or 0)
    if value < 1024:
        return f"{value:.0f}{sep}{byte_unit}"
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f}{sep}{unit}"
    return f"{value / 1024:.1f}{sep}GiB"
