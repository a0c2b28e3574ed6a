"""Usage ingestion: events in, rated, deduplicated, stored and debited, acknowledged.

- `domain`: what a valid event is, how it is rated, what its receipt says, the per-org debit
  metering asks the ledger for (OrgDebit, OrgOutcome) — plain Python;
- `convert`: the wire messages <-> the domain;
- `store`: the events, the ledger batches and the rating state in PostgreSQL;
- `committer`: the ack path (group commit: record, post to the ledger, answer);
- `rollup`: the roll-ups, off the ack path, exactly once.
"""
