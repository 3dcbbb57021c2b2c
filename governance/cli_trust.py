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
    DEMO_ROOT_KEY,
    PolicyTrustError,
    is_demo_root,
    read_policy,
    sign_policy_file,
)
from layerfed.governance.trust import (
    TrustRequest,
    TrustRules,
    TrustSetting,
    TrustSetupError,
    decide_trust,
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


CLI_FLAGS = {
    TrustSetting.ROOT_KEY: "--root-key",
    TrustSetting.TRUSTED: "--trusted",
    TrustSetting.VERIFY: "--root-key",
}
"""The flag that supplies each setting a trust refusal names."""


def policy_verify(
    file: Annotated[Path, typer.Argument(help="The policy file to verify.")],
    trusted: Annotated[
        Path | None,
        typer.Option(
            "--trusted",
            help="The previously trusted policy file (its signers rule); it must itself "
            "verify against --root-key first.",
        ),
    ] = None,
    root_key: Annotated[
        list[Path] | None,
        typer.Option("--root-key", help="Root public key (repeatable)."),
    ] = None,
    threshold: Annotated[
        int | None,
        typer.Option("--threshold", help="Root keys needed (default: all named).", min=1),
    ] = None,
) -> None:
    """Exit 0 only when FILE is trusted as a run would trust it: signed by the threshold,
    unexpired and not a rollback, from root keys or from a --trusted policy that those
    root keys verify first (the one trust decision the server and nodes make)."""
    request = TrustRequest(
        policy=file,
        root_keys=tuple(root_key or ()),
        trusted=trusted,
        threshold=threshold,
        rules=TrustRules(allow_demo_root=True),  # a deployment refuses it: said below
    )
    decision = decide_trust(request, now=datetime.now(UTC))
    error = decision.error
    if error is not None and not isinstance(error, PolicyTrustError):
        _fail(str(error).splitlines()[0])
    if error is not None or decision.policy is None:
        _fail(_untrusted(file, error))
    policy = decision.policy
    if is_demo_root([load_public_key(p) for p in request.root_keys]):
        err.print(
            f"warning: --root-key is the demo root {DEMO_ROOT_KEY.name} (its private half is "
            "public): only the gym trusts it; a deployed server or node refuses it",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    out.print(
        f"{file}: trusted: {policy.name} version {policy.version}, "
        f"signed by {len(decision.signed_by)} key(s), expires {policy.expires.isoformat()}",
        markup=False,
    )


def _untrusted(file: Path, error: PolicyTrustError | None) -> str:
    """One line: which file is not trusted, the reason code, and the flag to add."""
    if error is None:
        return f"{file}: not trusted"
    where = "" if error.where == str(file) else f"{error.where}: "
    line = f"{file}: not trusted: {where}{error.reason}: {error.detail}"
    if isinstance(error, TrustSetupError):
        line += f"; add {CLI_FLAGS[error.setting]} ROOT.pub"
        if error.setting is TrustSetting.ROOT_KEY:
            line += " (with --trusted PREV, the root key PREV must verify against)"
    return line


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
