"""`python -m services.accounts`."""

from services.accounts.server import main

main()
