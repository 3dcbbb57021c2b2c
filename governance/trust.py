"""One trust decision for a policy file, asked alike by the server, a node and the CLI.

A :class:`TrustRequest` names the policy file and what it may be trusted from: root
public keys, a ``trusted`` previous policy file, and the ``pinned`` policy a
checkpoint holds. :func:`verify_trust` applies the one rule and returns the
verified :class:`~layerfed.governance.schema.Policy` or raises; :func:`decide_trust`
is the same decision as a :class:`TrustDecision` that never raises (python-tuf style).

The rule, in order:

1. ``verify`` false is refused unless the :class:`TrustRules` allow an unverified
   research run (then the file is read, and on resume must be the pinned policy).
2. The demo root (whose private half ships with layerfed) is refused unless the rules
   allow it.
3. Trust starts at the pinned policy, else at the root keys. A ``trusted`` previous
   policy must itself verify from that start (expiry tolerated) before it vouches for
   the policy file; it then replaces the start.
4. With no start at all the request is refused, naming the setting to add.
5. The policy file must verify from the start: thresholds, version, expiry.

Errors are :class:`~layerfed.governance.signing.PolicyTrustError` (``.reason`` a
code); refusals of the request itself are :class:`TrustSetupError`, whose
``.setting`` (:class:`TrustSetting`) each boundary spells as its own key or flag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from layerfed.errors import LayerfedError
from layerfed.governance.canonical import policy_hash
from layerfed.governance.keys import load_public_key
from layerfed.governance.schema import Policy
from layerfed.governance.signing import (
    DEMO_ROOT_KEY,
    PolicyTrustError,
    check_policy,
    is_demo_root,
    load_signatures,
    read_policy,
    signature_path,
    verify_trust_anchor,
)

__all__ = [
    "DEPLOYMENT",
    "RESEARCH",
    "TrustDecision",
    "TrustRequest",
    "TrustRules",
    "TrustSetting",
    "TrustSetupError",
    "decide_trust",
    "verify_trust",
]

log = logging.getLogger("layerfed")


class TrustSetting(StrEnum):
    """The input of a :class:`TrustRequest` a refusal asks to change."""

    ROOT_KEY = "root_key"
    TRUSTED = "trusted"
    VERIFY = "verify"


class TrustSetupError(PolicyTrustError):
    """The request cannot establish trust: names the setting, what was expected and got.

    Codes (``.reason``): ``no_root``, ``demo_root``, ``unverified``.
    """

    def __init__(
        self, reason: str, setting: TrustSetting, expected: str, got: str, where: str = "policy"
    ) -> None:
        self.setting = setting
        self.expected = expected
        self.got = got
        super().__init__(reason, f"{setting.value}: expected {expected}, got {got}", where)


@dataclass(frozen=True)
class TrustRules:
    """What a caller may relax: only research runs (the gym, a local page) relax anything."""

    allow_demo_root: bool = False
    """Trust the demo root key, whose private half is public."""
    allow_unverified: bool = False
    """Read the policy without verifying it (``verify`` false)."""


DEPLOYMENT = TrustRules()
"""A deployed server or node: verified policies from the operator's own keys only."""
RESEARCH = TrustRules(allow_demo_root=True, allow_unverified=True)
"""The gym and local, undeployed instances: the demo root and unverified runs allowed."""


@dataclass(frozen=True)
class TrustRequest:
    """A policy file and everything it may be trusted from."""

    policy: Path
    root_keys: tuple[Path, ...] = ()
    trusted: Path | None = None
    """A previously trusted policy file; verified before it vouches for ``policy``."""
    pinned: Policy | None = None
    """The policy a checkpoint pins: only it or a signed successor passes."""
    verify: bool = True
    threshold: int | None = None
    """Root keys needed (None: all of them)."""
    rules: TrustRules = DEPLOYMENT


@dataclass(frozen=True)
class TrustDecision:
    """Outcome of :func:`decide_trust`; never raised."""

    ok: bool
    policy: Policy | None = None
    reason: str | None = None
    detail: str = ""
    setting: TrustSetting | None = None
    """The setting to add or change when a :class:`TrustSetupError` refused the request."""
    signed_by: tuple[str, ...] = ()
    error: LayerfedError | None = None


def _roots(request: TrustRequest) -> list[Ed25519PublicKey]:
    return [load_public_key(path) for path in request.root_keys]


def _unverified(request: TrustRequest) -> Policy:
    if not request.rules.allow_unverified:
        raise TrustSetupError(
            "unverified",
            TrustSetting.VERIFY,
            "true outside simulation (an unverified policy is for research runs only)",
            "false",
            str(request.policy),
        )
    policy = read_policy(request.policy)
    pinned = request.pinned
    if pinned is not None and policy_hash(policy) != policy_hash(pinned):
        raise PolicyTrustError(
            "pinned",
            f"expected the pinned policy {policy_hash(pinned)} (unverified runs cannot "
            f"change policy on resume), got {policy_hash(policy)}",
            str(request.policy),
        )
    log.warning("UNVERIFIED policy %s from %s (research only)", policy.name, request.policy)
    return policy


def _start(
    request: TrustRequest, roots: list[Ed25519PublicKey]
) -> tuple[Policy | None, list[Ed25519PublicKey]]:
    """The anchor policy and root keys ``request.policy`` must verify against."""
    anchor = request.pinned
    start = roots if anchor is None else []
    if request.trusted is not None:
        if anchor is None and not start:
            raise TrustSetupError(
                "no_root",
                TrustSetting.ROOT_KEY,
                f"a root public key the trusted previous policy {request.trusted} verifies "
                "against (a trusted policy is verified before it vouches for another)",
                "none",
                str(request.trusted),
            )
        anchor = verify_trust_anchor(
            request.trusted, trusted=anchor, root_keys=start, threshold=request.threshold
        )
        start = []
    if anchor is None and not start:
        raise TrustSetupError(
            "no_root",
            TrustSetting.ROOT_KEY,
            "the creator's root public key (or a trusted previous policy verified by one, "
            "or a checkpoint pinning a verified policy)",
            "none",
            str(request.policy),
        )
    return anchor, start


def _checked(request: TrustRequest, now: datetime | None) -> tuple[Policy, tuple[str, ...]]:
    if not request.verify:
        return _unverified(request), ()
    roots = _roots(request)
    if not request.rules.allow_demo_root and is_demo_root(roots):
        raise TrustSetupError(
            "demo_root",
            TrustSetting.ROOT_KEY,
            "your own root key",
            f"the demo root {DEMO_ROOT_KEY.name} whose private half is public (simulation only)",
            str(request.policy),
        )
    anchor, start = _start(request, roots)
    policy = read_policy(request.policy)
    signatures = load_signatures(signature_path(request.policy))
    when = now if now is not None else datetime.now(UTC)
    threshold = request.threshold if start else None
    result = check_policy(policy, signatures, anchor, start or None, threshold, when)
    if not result.ok:
        raise PolicyTrustError(result.reason or "malformed", result.detail, str(request.policy))
    log.info("trusted policy %s version %s from %s", policy.name, policy.version, request.policy)
    return policy, result.signed_by


def verify_trust(request: TrustRequest, *, now: datetime | None = None) -> Policy:
    """The verified policy of ``request`` (raises PolicyTrustError, PolicyError, KeyFileError)."""
    return _checked(request, now)[0]


def decide_trust(request: TrustRequest, *, now: datetime | None = None) -> TrustDecision:
    """:func:`verify_trust` as a :class:`TrustDecision` that never raises for bad input."""
    try:
        policy, signed_by = _checked(request, now)
    except TrustSetupError as e:
        return TrustDecision(False, None, e.reason, str(e), e.setting, error=e)
    except PolicyTrustError as e:
        return TrustDecision(False, None, e.reason, str(e), error=e)
    except LayerfedError as e:
        return TrustDecision(False, None, "malformed", str(e), error=e)
    return TrustDecision(True, policy, signed_by=signed_by)
