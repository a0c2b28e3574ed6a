"""The portal's screenshots under docs/portal/ (taken by tests/browser/test_portal_pages.py)
exist and show a page, not a blank or single-colour image."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "portal"
PAGES = ("overview", "usage", "transactions", "receipt", "budgets", "credit", "keys", "members",
         "alerts", "statements", "usage-375px")


@pytest.mark.parametrize("page", PAGES)
def test_each_screenshot_is_a_real_page(page: str) -> None:
    path = SHOTS / f"{page}.png"
    assert path.is_file(), (f"{path} is missing: run TALLY_UPDATE_SCREENSHOTS=1 pytest "
                            f"tests/browser/test_portal_pages.py")
    with Image.open(path) as image:
        assert image.width >= 375 and image.height >= 600
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # a blank page has one colour; a rendered page has text (anti-aliased: many shades) and
    # the dark header bar
    assert colours is None or len(colours) > 50, f"{page}: only {len(colours)} colours"
    dark = sum(count for count, (r, g, b) in (colours or []) if r + g + b < 150)
    assert colours is None or dark > 1000, f"{page}: no dark text or header"
