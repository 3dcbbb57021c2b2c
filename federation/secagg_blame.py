"""SecAgg+ accountability on the server: signed keys, signed shares, complaints judged.

A member's two public keys and its share ciphertexts each come inside an update
envelope signed by its node identity (see :mod:`layerfed.wire.secagg_crypto`);
:func:`signed_by_member` checks one against the policy like any update (principal,
certificate, layer authority, run, round, slot, instance). A receiver whose share
does not open complains with the ciphertext and its ``sk2``; :func:`judge_complaint`
decides who is to blame:

* the ciphertext is not the one the sender signed for this receiver, or ``sk2`` is
  not the receiver's signed ``pk2``, or the ciphertext opens into a well-formed
  share: the *complainer* is to blame (a false complaint);
* otherwise the sender signed a share that does not open: the *sender* is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerfed.errors import LayerfedError
from layerfed.governance.envelope import ReplayGuard, check_update, envelope_from_dict
from layerfed.governance.schema import Policy
from layerfed.wire.protocol import MessageError, Task
from layerfed.wire.secagg_crypto import ShareError, open_share, public_of, share_context
from layerfed.wire.secagg_shamir import split_plaintext

__all__ = ["Verdict", "judge_complaint", "signed_by_member"]


def signed_by_member(
    record: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray[Any, Any]],
    task: Task,
    policy: Policy,
    round_: int,
) -> str:
    """Why the envelope in ``record`` does not sign ``arrays`` as ``task``'s member ("" if it does)."""
    try:
        envelope = envelope_from_dict(record)
    except (LayerfedError, ValueError, TypeError) as e:
        return f"no signed envelope: {e}"
    claim = (envelope.layer, envelope.slot_key, envelope.instance_id)
    if claim != (task.layer, task.slot.key, task.instance_id):
        return f"signed for {'/'.join(claim)}, expected {task.layer}/{task.slot.key}/{task.instance_id}"
    check = check_update(
        envelope, arrays, policy, run_id=task.run_id, round=round_, replay_guard=ReplayGuard()
    )
    return "" if check.ok else f"{check.reason}: {check.detail}"


@dataclass(frozen=True)
class Verdict:
    """Who a complaint blames (a secagg id) and why."""

    blamed: int
    reason: str
    detail: str


def judge_complaint(
    task: Task,
    src: int,
    dst: int,
    text: bytes,
    signed_text: bytes | None,
    epk: bytes,
    sk2: bytes,
    pk2: bytes,
) -> Verdict:
    """Decide a complaint by ``dst`` about the share ``src`` sent it (see the module docstring).

    ``signed_text`` is the ciphertext ``src`` signed for ``dst`` (None: none) and
    ``epk`` the ephemeral key ``src`` signed with it; ``pk2`` is ``dst``'s signed
    receiving key.
    """
    if signed_text is None or text != signed_text:
        return Verdict(dst, "false_complaint", f"member {src} signed no such share for {dst}")
    try:
        if public_of(sk2) != pk2:
            return Verdict(dst, "false_complaint", f"the key shown is not member {dst}'s pk2")
    except MessageError as e:
        return Verdict(dst, "false_complaint", str(e))
    try:
        plain = open_share(
            sk2, epk, text, share_context(task.run_id, task.round, str(task.slot), src, dst)
        )
    except ShareError as e:
        return Verdict(src, "corrupt_share", f"the share member {src} signed for {dst}: {e}")
    try:
        split_plaintext(plain)
    except ValueError as e:
        return Verdict(src, "corrupt_share", f"member {src}'s share for {dst} is malformed: {e}")
    return Verdict(dst, "false_complaint", f"member {src}'s share for {dst} opens")
