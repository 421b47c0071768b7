"""What the people's routes share: the worklist and access services, the caller's address,
and the one answer for a study that is missing or not the caller's."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from reading_queue.access import Access
from reading_queue.worklist.service import Worklist


def get_worklist(request: Request) -> Worklist:
    worklist: Worklist = request.app.state.worklist
    return worklist


def get_access(request: Request) -> Access:
    access: Access = request.app.state.access
    return access


WorklistDep = Annotated[Worklist, Depends(get_worklist)]
AccessDep = Annotated[Access, Depends(get_access)]


def address(request: Request) -> str:
    return request.client.host if request.client else ""


def no_such_study(uid: str) -> HTTPException:
    """The same 404 whether the study does not exist or is not the caller's: a UID that is
    not yours tells you nothing (not even that it exists)."""
    return HTTPException(404, f"no study {uid}")
