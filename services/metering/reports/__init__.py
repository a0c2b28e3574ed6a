"""Usage reports: monthly summaries and exports read from the roll-ups.

- `domain`: the queries and their rules — plain Python;
- `convert`: the wire messages <-> the domain;
- `store`: the roll-up reads (SQLAlchemy Core).
"""
