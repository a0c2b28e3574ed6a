"""The audit log's rules in plain Python: what a record holds, how it chains, how a chain is
verified and exported.

Each org has one chain (the platform's calls, naming no org, have the chain of org ''): a
record's hash is SHA-256 over its predecessor's hash and every field of the record in a fixed
canonical form, so changing any field of any record, removing one or reordering two breaks
the chain at that record, and `verify` names it. The chain makes tampering evident, not
impossible: whoever can rewrite the table can rewrite every hash after the change too, so
exports (and the latest hash) belong somewhere else as well.

Retention (TALLY_ACCOUNTS_AUDIT_RETENTION_DAYS): records older than the period are exported
before they are deleted — a prefix of each chain, written as JSON Lines (hashes included) to
an archive file and flushed to disk first — and a checkpoint keeps the sequence and hash of
the last record removed. The chain left verifies from the checkpoint (its first record must
link to the checkpoint's hash), and each archive verifies from the checkpoint before it (the
first from the genesis hash), so the whole history stays checkable from the archives plus
the table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final

from tally.kit.errors import invalid

GENESIS: Final = "0" * 64
MAX_APPEND: Final = 5000
EXPORT_CHUNK_RECORDS: Final = 500
CSV_COLUMNS: Final = ("org_id", "sequence", "record_id", "time", "principal", "verified_by",
                      "service", "rpc", "target_ids", "request_sha256", "peer", "outcome",
                      "hash")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited call (sequence, prev_hash and hash are set when it joins its chain)."""

    record_id: str
    org_id: str
    at: datetime
    principal: str
    verified_by: str
    service: str
    rpc: str
    target_ids: tuple[str, ...]
    request_sha256: str
    peer: str
    outcome: str
    sequence: int = 0
    prev_hash: str = ""
    hash: str = ""

    def canonical(self) -> bytes:
        """The bytes the hash covers: every field but the hash itself."""
        return json.dumps([self.org_id, self.sequence, self.record_id, self.at.isoformat(),
                           self.principal, self.verified_by, self.service, self.rpc,
                           list(self.target_ids), self.request_sha256, self.peer,
                           self.outcome, self.prev_hash],
                          separators=(",", ":"), ensure_ascii=False).encode()

    def sealed(self) -> str:
        """This record's hash."""
        return hashlib.sha256(self.canonical()).hexdigest()


def chain(entries: Iterable[AuditEntry], last_sequence: int, last_hash: str
          ) -> list[AuditEntry]:
    """`entries` appended after (last_sequence, last_hash), each sealed in order."""
    sealed: list[AuditEntry] = []
    for entry in entries:
        last_sequence += 1
        linked = replace(entry, sequence=last_sequence, prev_hash=last_hash)
        linked = replace(linked, hash=linked.sealed())
        last_hash = linked.hash
        sealed.append(linked)
    return sealed


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of recomputing a chain."""

    is_intact: bool
    records_checked: int
    first_altered_sequence: int = 0
    first_altered_record_id: str = ""
    problem: str = ""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where an org's chain resumes after retention removed its older records."""

    org_id: str
    sequence: int
    """The last record removed (0: none)."""
    hash: str
    """Its hash: what the first record kept links to."""


def verify(entries: Iterable[AuditEntry], start: Checkpoint | None = None) -> Verdict:
    """Recomputes a chain in sequence order, from `start` (the genesis when None); names the
    first record that does not verify."""
    expected_prev, expected_sequence, checked = GENESIS, 1, 0
    if start is not None and start.sequence:
        expected_prev, expected_sequence = start.hash, start.sequence + 1
    for entry in entries:
        checked += 1
        problem = ""
        if entry.sequence != expected_sequence:
            problem = f"sequence {entry.sequence} where {expected_sequence} was expected " \
                      "(a record was removed or renumbered)"
        elif entry.prev_hash != expected_prev:
            problem = "does not link to the record before it"
        elif entry.sealed() != entry.hash:
            problem = "its contents do not match its hash"
        if problem:
            return Verdict(False, checked, entry.sequence, entry.record_id, problem)
        expected_prev, expected_sequence = entry.hash, entry.sequence + 1
    return Verdict(True, checked)


def _row(entry: AuditEntry) -> dict[str, object]:
    return {"org_id": entry.org_id, "sequence": entry.sequence, "record_id": entry.record_id,
            "time": entry.at.isoformat(), "principal": entry.principal,
            "verified_by": entry.verified_by, "service": entry.service, "rpc": entry.rpc,
            "target_ids": list(entry.target_ids), "request_sha256": entry.request_sha256,
            "peer": entry.peer, "outcome": entry.outcome, "hash": entry.hash}


def export_header(fmt: str) -> bytes:
    """What an export starts with: the CSV header row, or nothing for JSON Lines."""
    if fmt != "csv":
        return b""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(CSV_COLUMNS)
    return buffer.getvalue().encode()


def export_page(page: Sequence[AuditEntry], fmt: str) -> bytes:
    """One page of records as CSV rows or JSON Lines."""
    if fmt != "csv":
        return "".join(json.dumps(_row(e), ensure_ascii=False) + "\n" for e in page).encode()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for entry in page:
        row = _row(entry)
        row["target_ids"] = " ".join(entry.target_ids)
        writer.writerow([row[c] for c in CSV_COLUMNS])
    return buffer.getvalue().encode()


def checked_batch(entries: Sequence[AuditEntry]) -> Sequence[AuditEntry]:
    """A shipped batch, bounded and with ids (INVALID_ARGUMENT naming the field otherwise)."""
    if len(entries) > MAX_APPEND:
        raise invalid("records", f"at most {MAX_APPEND} per call")
    for index, entry in enumerate(entries):
        if not entry.record_id or len(entry.record_id) > 128:
            raise invalid(f"records[{index}].record_id", "must be 1..128 characters")
        if not entry.rpc:
            raise invalid(f"records[{index}].rpc", "is required")
    return entries


def archive_name(org_id: str, first: int, last: int) -> str:
    """The archive file of an org's records first..last (the platform chain is `_platform`)."""
    return f"{org_id or '_platform'}/{first:012d}-{last:012d}.jsonl"


def archive_lines(entries: Sequence[AuditEntry]) -> bytes:
    """Records as archived: JSON Lines of every field, prev_hash and hash included."""
    return "".join(json.dumps({**_row(e), "prev_hash": e.prev_hash}, ensure_ascii=False)
                   + "\n" for e in entries).encode()


def parse_archive(text: str) -> list[AuditEntry]:
    """The records of an archive (as `archive_lines` wrote them)."""
    entries = []
    for line in filter(None, text.splitlines()):
        row = json.loads(line)
        entries.append(AuditEntry(
            row["record_id"], row["org_id"], datetime.fromisoformat(row["time"]),
            row["principal"], row["verified_by"], row["service"], row["rpc"],
            tuple(row["target_ids"]), row["request_sha256"], row["peer"], row["outcome"],
            row["sequence"], row["prev_hash"], row["hash"]))
    return entries
