"""The gateway's state schema (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Times are Unix seconds (float) so both databases store and compare them the same way.
``SCHEMA_VERSION`` is bumped with every change; :data:`MIGRATIONS` holds the steps from
one version to the next (version 1 is created from the metadata as it stands).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 1

metadata = MetaData()

schema_version = Table(
    "guarita_schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied", Float, nullable=False),
)

# One row per running gateway process; ``heartbeat`` is refreshed every few seconds so the
# other replicas can tell when one died (its sessions and their pending requests are gone).
replicas = Table(
    "replicas", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("info", JSON, nullable=False, default=dict),
)

approval_requests = Table(
    "approval_requests", metadata,
    Column("id", String(32), primary_key=True),
    Column("session_id", String(64), nullable=False),
    Column("replica_id", String(64), nullable=False),
    Column("requester", JSON, nullable=False),  # Identity.to_dict()
    Column("requester_issuer", String(512), nullable=False),
    Column("requester_subject", String(512), nullable=False),
    Column("front_door", String(16), nullable=False),
    Column("kind", String(16), nullable=False),  # "exec", "interactive", "shell"
    Column("target", String(255)),  # SSH target or Kubernetes cluster
    Column("login", String(255)),
    Column("namespace", String(255)),
    Column("pod", String(255)),
    Column("command", Text, nullable=False),
    Column("rule", String(255), nullable=False),
    Column("message", Text),
    Column("approver_groups", JSON, nullable=False),
    Column("min_approvals", Integer, nullable=False, default=1),
    # pending -> approved | denied | expired | cancelled (never back to pending)
    Column("status", String(16), nullable=False, index=True),
    Column("status_reason", Text),
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
    Column("decided", Float),
)
Index("approval_requests_session", approval_requests.c.session_id)

approval_decisions = Table(
    "approval_decisions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(32), ForeignKey("approval_requests.id", ondelete="CASCADE"), nullable=False),
    Column("approver_issuer", String(512), nullable=False),
    Column("approver_subject", String(512), nullable=False),
    Column("approver", JSON, nullable=False),
    Column("decision", String(16), nullable=False),  # "approve" or "deny"
    Column("reason", Text, nullable=False),
    Column("created", Float, nullable=False),
    UniqueConstraint("request_id", "approver_issuer", "approver_subject", name="one_decision_per_approver"),
)

# Every command a session ran or tried (exec commands and interactive command lines),
# with what became of it: the index behind `replay search` across sessions.
commands = Table(
    "commands", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("session_id", String(64), nullable=False, index=True),
    Column("t", Float, nullable=False),  # seconds from the session start (as in the recording)
    Column("at", Float, nullable=False, index=True),  # Unix time
    Column("subject", String(512)),
    Column("target", String(255)),
    Column("command", Text, nullable=False),
    # allowed | approved | denied | expired | cancelled | rate-limited
    Column("outcome", String(16), nullable=False),
    Column("rule", String(255)),
    Column("request_id", String(32)),
)

# Live sessions across replicas (for `bastion sessions ls` / kill, issue 8).
live_sessions = Table(
    "live_sessions", metadata,
    Column("id", String(64), primary_key=True),
    Column("replica_id", String(64), nullable=False, index=True),
    Column("identity", JSON, nullable=False),
    Column("subject", String(512), nullable=False),
    Column("front_door", String(16), nullable=False),
    Column("target", String(255)),
    Column("login", String(255)),
    Column("kind", String(16)),
    Column("command", Text),
    Column("source", String(255)),
    Column("started", Float, nullable=False),
    Column("bytes_in", BigInteger, nullable=False, default=0),
    Column("bytes_out", BigInteger, nullable=False, default=0),
    Column("updated", Float, nullable=False),
)

# Locks (issue 8): refuse new sessions matching (kind, value) and end live ones.
locks = Table(
    "locks", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),  # subject | group | target | claim
    Column("value", String(512), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_by", JSON, nullable=False),
    Column("created", Float, nullable=False),
    Column("until", Float),
    Column("removed", Float),
)

# version -> SQL statements that take the schema from version-1 to version.
MIGRATIONS: dict[int, list[str]] = {}

# The archive index (bastion/state/archive.py): sealed sessions, their commands and the keyed
# hashes of values masked in them, filled as sessions are stored and rebuildable from the
# bucket (`replay index --rebuild`). New tables only: create_all adds them to an existing
# database, so the schema version stays.
archive_sessions = Table(
    "archive_sessions", metadata,
    Column("id", String(64), primary_key=True),
    Column("started", Float, nullable=False, index=True),  # Unix time
    Column("state", String(16), nullable=False),  # complete | recovered
    # The manifest without its signature, key and index: what `replay ls` shows and filters on.
    Column("manifest", JSON, nullable=False),
    Column("indexed", Float, nullable=False),
)

# Every name a session answers to in `--subject`: subject, e-mail, actors of its delegation chain.
archive_names = Table(
    "archive_names", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("name", String(512), primary_key=True),
)
Index("archive_names_name", archive_names.c.name, archive_names.c.session_id)

archive_commands = Table(
    "archive_commands", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),  # recording order in the session
    Column("t", Float, nullable=False),
    Column("command", Text, nullable=False),
)

archive_masked = Table(
    "archive_masked", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("hmac", String(128), nullable=False),
    Column("t", Float, nullable=False),
    Column("stream", String(8), nullable=False),
    Column("detector", String(64), nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("length", Integer, nullable=False),
)
Index("archive_masked_hmac", archive_masked.c.hmac)
