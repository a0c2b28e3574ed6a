"""`python -m services.pricing`."""

from services.pricing.server import main

main()
