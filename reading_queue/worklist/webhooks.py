"""Webhooks: escalations and STAT pages written to an outbox and delivered from it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from reading_queue.models import (
    WebhookDelivery,
    WorklistEvent,
)
from reading_queue.worklist.engine import (
    QueuedStudy,
)
from reading_queue.worklist.store import WorklistStore
from telerad.core.backoff import backoff_delay
from telerad.core.priority import Priority

logger = logging.getLogger(__name__)


class WebhooksMixin(WorklistStore):
    """Webhooks: escalations and STAT pages written to an outbox and delivered from it."""

    def _notify_stat(
        self,
        s: Session,
        st: QueuedStudy,
        radiologist: str,
        sets_aside: bool,
        reasons: list[str],
        now: float,
    ) -> None:
        """Queue a ``study.stat_assigned`` webhook for the assignment event just written (a
        reader who claims a STAT needs no telling)."""
        if not self.stat_webhook_urls:
            return
        event_id = s.scalar(
            select(func.max(WorklistEvent.id)).where(
                WorklistEvent.study_uid == st.uid,
                WorklistEvent.kind.in_(("assigned", "reassigned")),
            )
        )
        self._queue_webhooks(
            s,
            self.stat_webhook_urls,
            "study.stat_assigned",
            event_id,
            st,
            radiologist,
            reasons,
            now,
            set_aside=sets_aside,
        )

    def _queue_webhooks(
        self,
        s: Session,
        urls: Sequence[str],
        event: str,
        event_id: int | None,
        st: QueuedStudy,
        radiologist: str | None,
        reasons: Sequence[str],
        now: float,
        **extra: Any,
    ) -> None:
        """One outbox row per URL for ``event`` about ``st`` (no patient data)."""
        payload = {
            "event": event,
            "event_id": event_id,
            "study_uid": st.uid,
            "station": st.station,
            "modality": st.modality,
            "priority": Priority(st.priority).label,
            "deadline": st.deadline,
            "minutes_left": round((st.deadline - now) / 60.0, 1),
            "radiologist": radiologist,
            **extra,
            "reasons": list(reasons),
        }
        for url in urls:
            s.add(WebhookDelivery(event_id=event_id, url=url, payload=payload, next_attempt_at=now))

    def deliver_webhooks(
        self, now: float | None = None, *, client: httpx.Client | None = None
    ) -> int:
        """Post due webhooks (escalations, STAT assignments); failures back off (10 s
        doubling, at most 1 h)."""
        now = self.clock() if now is None else now
        with self.read() as s:
            due = list(
                s.scalars(
                    select(WebhookDelivery)
                    .where(
                        WebhookDelivery.delivered_at.is_(None),
                        WebhookDelivery.next_attempt_at <= now,
                    )
                    .order_by(WebhookDelivery.id)
                    .limit(100)
                )
            )
        if not due:
            return 0
        own = client is None
        http = client or httpx.Client(timeout=10.0)
        delivered = 0
        try:
            for d in due:
                error = ""
                try:
                    resp = http.post(d.url, json=d.payload)
                    if resp.status_code >= 300:
                        error = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self.session.begin() as s:
                    if not error:
                        s.execute(
                            update(WebhookDelivery)
                            .where(WebhookDelivery.id == d.id)
                            .values(delivered_at=self.clock(), attempts=d.attempts + 1)
                        )
                        delivered += 1
                    else:
                        backoff = backoff_delay(d.attempts, base_s=10.0, cap_s=3600.0, jitter=False)
                        s.execute(
                            update(WebhookDelivery)
                            .where(WebhookDelivery.id == d.id)
                            .values(
                                attempts=d.attempts + 1,
                                next_attempt_at=now + backoff,
                                last_error=error[:500],
                            )
                        )
                        logger.warning(
                            "webhook %d to %s failed (%s); next try in %.0f s",
                            d.id,
                            d.url,
                            error,
                            backoff,
                        )
        finally:
            if own:
                http.close()
        return delivered
