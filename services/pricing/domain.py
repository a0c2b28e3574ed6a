"""Pricing's rules for what it answers today: the credit packages on sale, page by page.

The packages come from the price book in force; until PublishPriceBook lands that is the
default catalog shipped with the rating library, loaded once at start-up. No grpc, no SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from tally.kit.paging import next_offset_token, page_request
from tally.rating import CreditPackage, PriceBook

UNPUBLISHED_VERSION: Final = 0
"""Version reported for a book that was never published (the proto's "0 in drafts").

The default catalog's own version is a label such as "2025-07-01.1"; published versions are
the integers 1, 2, ... assigned by PublishPriceBook, so the built-in catalog reports 0.
"""


@dataclass(frozen=True, slots=True)
class PackagePage:
    """One page of credit packages and the book they come from."""

    packages: Sequence[CreditPackage]
    next_page_token: str
    price_book_version: int


class CreditPackageCatalog:
    """The credit packages of the book in force, in the book's display order."""

    def __init__(self, book: PriceBook, *, version: int = UNPUBLISHED_VERSION) -> None:
        self._packages = tuple(book.packages)
        self._version = version

    def list_packages(self, page_size: int, page_token: str) -> PackagePage:
        """One page of packages; raises INVALID_ARGUMENT naming a bad page_size or page_token."""
        request = page_request(page_size, page_token)
        chosen = self._packages[request.offset : request.offset + request.page_size]
        token = next_offset_token(request, len(chosen), len(self._packages))
        return PackagePage(chosen, token, self._version)
