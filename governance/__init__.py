"""Governance: the policy language, keys and signatures, trust, and the audit log (no torch).

Names load on first use, so a command that needs one module (``policy check`` on a
missing file) does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerfed._lazy import lazy_getattr

if TYPE_CHECKING:
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

_HOMES = {
    "AuditError": "layerfed.governance.audit",
    "AuditLog": "layerfed.governance.audit",
    "Change": "layerfed.governance.diff",
    "CheckResult": "layerfed.governance.loader",
    "InstanceCertificate": "layerfed.governance.envelope",
    "KeyFileError": "layerfed.governance.keys",
    "LayerPolicy": "layerfed.governance.schema",
    "Policy": "layerfed.governance.schema",
    "PolicyTrustError": "layerfed.governance.signing",
    "TrustError": "layerfed.governance.keys",
    "UpdateEnvelope": "layerfed.governance.envelope",
    "UpdateRejected": "layerfed.governance.envelope",
    "certify_instance": "layerfed.governance.envelope",
    "check_policy_file": "layerfed.governance.loader",
    "check_update": "layerfed.governance.envelope",
    "diff_policies": "layerfed.governance.diff",
    "generate_keypair": "layerfed.governance.keys",
    "load_policy": "layerfed.governance.loader",
    "load_private_key": "layerfed.governance.keys",
    "load_public_key": "layerfed.governance.keys",
    "public_key_string": "layerfed.governance.keys",
    "read_policy": "layerfed.governance.signing",
    "sign_policy_file": "layerfed.governance.signing",
    "sign_update": "layerfed.governance.envelope",
    "verify_audit": "layerfed.governance.audit",
    "verify_policy_file": "layerfed.governance.signing",
    "verify_update": "layerfed.governance.envelope",
}
"""Where each public name lives."""


__getattr__ = lazy_getattr("layerfed.governance", _HOMES, globals())
