"""`python -m services.metering`."""

from services.metering.server import main

main()
