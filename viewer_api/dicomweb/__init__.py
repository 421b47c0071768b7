"""DICOMweb at ``/dicom-web``: QIDO-RS (``qido``), WADO-RS (``wado``), rendered and thumbnail
(``rendered``). Every route asks ``reading_queue.access``: a study that is not the caller's
answers exactly like one that does not exist (404); every answer is audited."""

from __future__ import annotations

from fastapi import APIRouter

from viewer_api.dicomweb import qido, rendered, wado

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])
router.include_router(qido.router)
router.include_router(wado.router)
router.include_router(rendered.router)
