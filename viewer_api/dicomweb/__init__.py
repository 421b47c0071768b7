"""DICOMweb (QIDO-RS, WADO-RS, rendered) at ``/dicom-web`` (being built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])
