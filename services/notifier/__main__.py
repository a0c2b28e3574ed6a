"""`python -m services.notifier`."""

from services.notifier.server import main

main()
