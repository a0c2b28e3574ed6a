"""An OpenAI-compatible gateway on Tally (see README.md here): authorize, run the chosen model,
report usage, return the receipt."""
