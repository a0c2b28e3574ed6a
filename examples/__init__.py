"""Runnable examples of services built on Tally."""
