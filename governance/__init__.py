"""Governance: the policy language, keys and signatures, trust, and the audit log (no torch)."""

from __future__ import annotations

from layerfed.governance.audit import AuditError, AuditLog, verify_audit
from layerfed.governance.diff import Change, diff_policies
from layerfed.governance.envelope import (
    InstanceCertificate,
    UpdateEnvelope,
    UpdateRejected,
    certify_instance,
    check_update,
    sign_update,
    verify_update,
)
from layerfed.governance.keys import (
    KeyFileError,
    TrustError,
    generate_keypair,
    load_private_key,
    load_public_key,
    public_key_string,
)
from layerfed.governance.loader import CheckResult, check_policy_file, load_policy
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.governance.signing import (
    PolicyTrustError,
    read_policy,
    sign_policy_file,
    verify_policy_file,
)

__all__ = [
    "AuditError",
    "AuditLog",
    "Change",
    "CheckResult",
    "InstanceCertificate",
    "KeyFileError",
    "LayerPolicy",
    "Policy",
    "PolicyTrustError",
    "TrustError",
    "UpdateEnvelope",
    "UpdateRejected",
    "certify_instance",
    "check_policy_file",
    "check_update",
    "diff_policies",
    "generate_keypair",
    "load_policy",
    "load_private_key",
    "load_public_key",
    "public_key_string",
    "read_policy",
    "sign_policy_file",
    "sign_update",
    "verify_audit",
    "verify_policy_file",
    "verify_update",
]
