"""Trust commands: `keys new`, `policy sign`, `policy verify`, `audit verify|repair`.

Each prints with rich, exits 0 only on success and 1 with one clear line otherwise;
typed errors never surface as tracebacks.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from layerfed.errors import LayerfedError
from layerfed.governance.audit import AuditError, AuditLog, verify_audit
from layerfed.governance.keys import generate_keypair, load_private_key, load_public_key
from layerfed.governance.signing import (
    check_policy,
    load_signatures,
    read_policy,
    sign_policy_file,
    signature_path,
)

__all__ = ["audit_app", "keys_app", "policy_sign", "policy_verify"]

keys_app = typer.Typer(help="Create Ed25519 signing keys.", no_args_is_help=True)
audit_app = typer.Typer(help="Check and repair hash-chained audit logs.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

PassphraseEnv = Annotated[
    str | None,
    typer.Option(
        "--passphrase-env",
        help="Name of an environment variable holding the key's passphrase.",
    ),
]


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}", style="red", markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _passphrase(var: str | None) -> bytes | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        _fail(f"--passphrase-env: expected a set, non-empty variable {var!r}, got none")
    return value.encode("utf-8")


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Option("--name", help="Key name; files NAME.pem, NAME.pub.pem.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the key pair into.")],
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Generate an Ed25519 key pair (private key file mode 0600)."""
    try:
        pair = generate_keypair(name, out_dir, _passphrase(passphrase_env))
    except LayerfedError as e:
        _fail(str(e))
    out.print(f"private key: {pair.private_path} (mode 0600)", markup=False)
    out.print(f"public key:  {pair.public_path}", markup=False)
    out.print(f"key id:      {pair.key_id}", markup=False)
    out.print(f'for policies: public_key: "{pair.public_key}"', markup=False)


def policy_sign(
    file: Annotated[Path, typer.Argument(help="The policy file to sign.")],
    key: Annotated[Path, typer.Option("--key", help="Private key (PEM) to sign with.")],
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Add this key's signature to FILE.sig.json, over the policy's canonical bytes.

    Exit 2 for a policy without ``policy_signers``: no signature on it could ever verify.
    """
    try:
        if read_policy(file).policy_signers is None:
            err.print(
                f"error: {file}: policy_signers: expected a 'policy_signers' block naming who "
                "signs policies (principals and threshold), got none; without it no signature "
                "on this policy could ever verify, so it is not signed",
                style="red",
                markup=False,
                soft_wrap=True,
            )
            raise typer.Exit(2)
        private = load_private_key(key, _passphrase(passphrase_env))
        path = sign_policy_file(file, private)
    except LayerfedError as e:
        _fail(str(e).splitlines()[0])
    out.print(f"signed {file} -> {path}", markup=False)


def policy_verify(
    file: Annotated[Path, typer.Argument(help="The policy file to verify.")],
    trusted: Annotated[
        Path | None,
        typer.Option("--trusted", help="The previously trusted policy file (its signers rule)."),
    ] = None,
    root_key: Annotated[
        list[Path] | None,
        typer.Option("--root-key", help="Root public key for a first policy (repeatable)."),
    ] = None,
    threshold: Annotated[
        int | None,
        typer.Option("--threshold", help="Root keys needed (default: all named).", min=1),
    ] = None,
) -> None:
    """Exit 0 only when FILE is signed by the threshold, unexpired and not a rollback."""
    try:
        policy = read_policy(file)
        signatures = load_signatures(signature_path(file))
        previous = read_policy(trusted) if trusted is not None else None
        roots = [load_public_key(p) for p in root_key or []]
    except LayerfedError as e:
        _fail(str(e).splitlines()[0])
    result = check_policy(policy, signatures, previous, roots, threshold, datetime.now(UTC))
    if not result.ok:
        _fail(f"{file}: not trusted: {result.reason}: {result.detail}")
    out.print(
        f"{file}: trusted: {policy.name} version {policy.version}, "
        f"signed by {len(result.signed_by)} key(s), expires {policy.expires.isoformat()}",
        markup=False,
    )


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="The audit log (JSONL).")],
    anchor: Annotated[
        str | None,
        typer.Option("--anchor", help="Hash of a record that must be in the log (cut tails)."),
    ] = None,
) -> None:
    """Exit 0 only for an intact chain; otherwise name the first broken record."""
    report = verify_audit(file, anchor)
    if not report.ok:
        _fail(f"{file}:{report.first_broken_line}: {report.reason}")
    out.print(f"{file}: intact, {report.records} record(s)", markup=False)


@audit_app.command("repair")
def audit_repair(file: Annotated[Path, typer.Argument(help="The audit log (JSONL).")]) -> None:
    """Cut a torn last line (partial write) and record the cut in the log."""
    try:
        record = AuditLog.repair(file)
    except AuditError as e:
        _fail(str(e))
    fields = record["fields"]
    out.print(f"{file}: cut {fields['cut_bytes']} byte(s) at line {fields['cut_line']}")
