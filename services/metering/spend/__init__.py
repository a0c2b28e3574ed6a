"""Spend control of Authorize: the rules (domain), the quota gate (quotas), the credit lease
(lease, lease_manager), what they keep in Postgres (store, lease_store), proto <-> domain
(convert), and the orchestration of one decision (authorizer)."""
