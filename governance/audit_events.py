"""The kinds of audit record, typed: one enum, so no module spells a kind by hand.

Each member's value is the ``kind`` string written to ``audit.jsonl`` (stable:
readers, reports and replay match on it). :meth:`layerfed.governance.audit.AuditLog.append`
takes only these.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AuditKind"]


class AuditKind(StrEnum):
    """Every kind of record the audit log may hold."""

    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_GRANTED = "approval_granted"
    APPROVAL_REFUSED = "approval_refused"
    APPROVAL_REQUESTED = "approval_requested"
    AUDIT_REPAIR = "audit_repair"
    CANDIDATE_KEPT = "candidate_kept"
    COMMIT = "commit"
    NO_FEEDBACK = "no_feedback"
    NODE_REFUSED = "node_refused"
    NODE_UNREACHABLE = "node_unreachable"
    POLICY_LOAD = "policy_load"
    PRIVACY_BUDGET_EXHAUSTED = "privacy_budget_exhausted"
    PRIVACY_NOISE = "privacy_noise"
    PRIVACY_SPENT = "privacy_spent"
    RED_LINE_BREACH = "red_line_breach"
    RED_LINES_AT_START = "red_lines_at_start"
    REPLY_UNEXPECTED = "reply_unexpected"
    RESUME = "resume"
    ROUND_END = "round_end"
    ROUND_START = "round_start"
    RUN_END = "run_end"
    SECAGG = "secagg"
    SLOT_SKIPPED = "slot_skipped"
    UPDATE_ACCEPTED = "update_accepted"
    UPDATE_CLIPPED = "update_clipped"
    UPDATE_DROPPED = "update_dropped"
    UPDATE_MISSING = "update_missing"
    UPDATE_RECEIVED = "update_received"
    UPDATE_REFUSED = "update_refused"
    VETO = "veto"
    WEIGHT_CAPPED = "weight_capped"
