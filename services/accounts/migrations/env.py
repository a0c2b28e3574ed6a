"""Alembic environment: the kit runs every service's migrations the same way."""

from alembic import context

from tally.kit.db import run_alembic_env

run_alembic_env(context)
