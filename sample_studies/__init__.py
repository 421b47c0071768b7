"""Synthetic, deterministic DICOM studies: demo data, test fixtures and benchmark load.

Nothing here is real patient data; see ``PROVENANCE.md``. The generator lives in
:mod:`sample_studies.generate`. Its public functions are re-exported lazily, so importing
this package stays cheap (no numpy) and ``python -m sample_studies.generate`` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sample_studies.generate import (
        KHMER_PATIENT,
        KHMER_SITE,
        VIETNAMESE_PATIENT,
        VIETNAMESE_SITE,
        SamplePatient,
        SampleSite,
        committed_samples,
        generate_samples,
        make_cr,
        make_ct_series,
        restamp,
        sample_uid,
    )

__all__ = [
    "KHMER_PATIENT",
    "KHMER_SITE",
    "VIETNAMESE_PATIENT",
    "VIETNAMESE_SITE",
    "SamplePatient",
    "SampleSite",
    "committed_samples",
    "generate_samples",
    "make_cr",
    "make_ct_series",
    "restamp",
    "sample_uid",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sample_studies.generate"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
