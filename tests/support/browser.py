"""A headless Chromium (Debian's ``/usr/bin/chromium``, never a downloaded one) driven by
Playwright, set up the way OHIF needs it here (FIELD-NOTES): software WebGL, no service
workers, the onboarding tour marked as shown; every failed request and every answer >= 400
is kept in a network log the tests assert on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.support.peers import chromium_binary, require_peer

CHROMIUM_ARGS = (
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--no-first-run",
)
#: OHIF's first-visit tour covers the viewport until this is in localStorage
_NO_TOURS = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


@dataclass
class NetworkLog:
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return self.failed + self.errors


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 900)) -> Iterator[tuple[Any, NetworkLog]]:
    binary = chromium_binary()
    require_peer("chromium", binary is not None, "Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    log = NetworkLog()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                service_workers="block", viewport={"width": viewport[0], "height": viewport[1]}
            )
            context.add_init_script(_NO_TOURS)
            page = context.new_page()
            page.on("request", lambda r: log.requests.append(r.url))
            page.on(
                "requestfailed",
                lambda r: log.failed.append(f"{r.method} {r.url}: {r.failure}"),
            )
            page.on(
                "response",
                lambda r: (
                    log.errors.append(f"{r.request.method} {r.url}: {r.status}")
                    if r.status >= 400
                    else None
                ),
            )
            yield page, log
        finally:
            browser.close()


def sign_in(page: Any, base_url: str, username: str, password: str, next_path: str) -> None:
    """Through the hub's own sign-in page, as a person would."""
    from urllib.parse import quote

    page.goto(f"{base_url}/login?next={quote(next_path, safe='')}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def image_spread(png: bytes) -> tuple[float, int]:
    """(standard deviation, number of distinct grey levels) of a screenshot: a viewport
    showing an image has many; a black or placeholder one has few."""
    from PIL import Image, ImageStat

    img = Image.open(io.BytesIO(png)).convert("L")
    stat = ImageStat.Stat(img)
    levels = sum(1 for n in img.histogram() if n)
    return float(stat.stddev[0]), levels
