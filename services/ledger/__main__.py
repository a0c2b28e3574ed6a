"""Run the ledger service: python -m services.ledger."""

from services.ledger.server import main

main()
