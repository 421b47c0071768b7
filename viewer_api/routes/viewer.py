"""The prebuilt OHIF viewer, served by the hub (being built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["viewer"])
