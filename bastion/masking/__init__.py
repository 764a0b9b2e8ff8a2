"""Masking personal data in terminal streams (DESIGN.md section 6, docs/masking.md).

``detectors``  what is personal data (CPF, CNPJ, card, phones, e-mail, custom) and how a
               found value is replaced;
``stream``     :class:`StreamMasker`, which masks a byte stream fed in chunks;
``config``     the ``[masking]`` table: detectors, custom patterns, where masking applies.
"""

from bastion.masking.detectors import (
    BUILTIN_NAMES,
    Detector,
    Replacement,
    builtin_detector,
    check_pattern,
    custom_detector,
    default_detectors,
    hmac_value,
    normalise_value,
)
from bastion.masking.stream import MARKER_FIELDS, Masked, StreamMasker, marker_values, mask_bytes

__all__ = [
    "BUILTIN_NAMES",
    "MARKER_FIELDS",
    "Detector",
    "Masked",
    "Replacement",
    "StreamMasker",
    "builtin_detector",
    "check_pattern",
    "custom_detector",
    "default_detectors",
    "hmac_value",
    "mask_bytes",
    "marker_values",
    "normalise_value",
]
