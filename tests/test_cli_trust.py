"""Trust commands through Typer: keys new, policy sign/verify, audit verify/repair."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.cli_trust import audit_app, keys_app, policy_sign, policy_verify

DEFAULT = Path(__file__).resolve().parent.parent / "examples" / "policies" / "default.yaml"
runner = CliRunner()


def build_app() -> typer.Typer:
    """The trust commands mounted the way the main CLI mounts them."""
    app = typer.Typer(pretty_exceptions_enable=False)
    policy = typer.Typer()
    policy.command("sign")(policy_sign)
    policy.command("verify")(policy_verify)
    app.add_typer(keys_app, name="keys")
    app.add_typer(policy, name="policy")
    app.add_typer(audit_app, name="audit")
    return app


APP = build_app()


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Any:
    """Run the app; assert no traceback ever escapes."""
    result = runner.invoke(APP, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def new_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    """Create a key with the CLI; its private key path and ed25519: string."""
    result = invoke("keys", "new", "--name", name, "--out", tmp_path / "keys")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "public_key:" in x)
    return tmp_path / "keys" / f"{name}.pem", line.split('"')[1]


def write_policy(path: Path, public_key: str, version: int) -> Path:
    """The default policy with ``public_key`` as its only creator signer."""
    data: dict[str, Any] = yaml.safe_load(DEFAULT.read_text())
    data["version"] = version
    data["principals"][0]["public_key"] = public_key
    path.write_text(yaml.safe_dump(data))
    return path


def test_keys_new_writes_pair_and_refuses_overwrite(tmp_path: Path) -> None:
    """`keys new` writes a 0600 key and a public key; a second run fails cleanly."""
    private, _ = new_key(tmp_path, "creator")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "creator.pub.pem").exists()
    again = invoke("keys", "new", "--name", "creator", "--out", tmp_path / "keys")
    assert again.exit_code == 1 and "existing file" in again.output


def test_keys_new_with_passphrase_env(tmp_path: Path) -> None:
    """--passphrase-env encrypts the key; an unset variable fails with one line."""
    ok = invoke(
        "keys", "new", "--name", "k", "--out", tmp_path, "--passphrase-env", "PW", env={"PW": "pw"}
    )
    assert ok.exit_code == 0 and b"ENCRYPTED" in (tmp_path / "k.pem").read_bytes()
    missing = invoke("keys", "new", "--name", "j", "--out", tmp_path, "--passphrase-env", "NOPE")
    assert missing.exit_code == 1 and "NOPE" in missing.output


def test_sign_then_verify_with_root_key(tmp_path: Path) -> None:
    """A policy signed with the creator key verifies against that root key only."""
    private, public = new_key(tmp_path, "creator")
    policy = write_policy(tmp_path / "p.yaml", public, 1)
    assert invoke("policy", "sign", policy, "--key", private).exit_code == 0
    root = tmp_path / "keys" / "creator.pub.pem"
    ok = invoke("policy", "verify", policy, "--root-key", root)
    assert ok.exit_code == 0 and "trusted" in ok.output
    no_root = invoke("policy", "verify", policy)
    assert no_root.exit_code == 1 and "no_root" in no_root.output


def test_verify_refuses_tampered_and_rollback(tmp_path: Path) -> None:
    """A changed policy and an older version than --trusted (itself verified by --root-key)
    both exit 1 with the reason."""
    private, public = new_key(tmp_path, "creator")
    v1 = write_policy(tmp_path / "v1.yaml", public, 1)
    v2 = write_policy(tmp_path / "v2.yaml", public, 2)
    for path in (v1, v2):
        assert invoke("policy", "sign", path, "--key", private).exit_code == 0
    root = tmp_path / "keys" / "creator.pub.pem"
    assert invoke("policy", "verify", v2, "--trusted", v1, "--root-key", root).exit_code == 0
    rollback = invoke("policy", "verify", v1, "--trusted", v2, "--root-key", root)
    assert rollback.exit_code == 1 and "rollback" in rollback.output
    v2.write_text(v2.read_text().replace("server_lr: 0.5", "server_lr: 0.9"))
    tampered = invoke("policy", "verify", v2, "--trusted", v1, "--root-key", root)
    assert tampered.exit_code == 1 and "under_threshold" in tampered.output


@pytest.mark.parametrize("missing", ["policy", "signatures", "key"])
def test_missing_files_fail_with_one_line(tmp_path: Path, missing: str) -> None:
    """Missing policy, signature or key files exit 1 with a message, no traceback."""
    private, public = new_key(tmp_path, "creator")
    policy = write_policy(tmp_path / "p.yaml", public, 1)
    if missing == "policy":
        result = invoke("policy", "sign", tmp_path / "none.yaml", "--key", private)
    elif missing == "signatures":
        root = tmp_path / "keys" / "creator.pub.pem"
        result = invoke("policy", "verify", policy, "--root-key", root)
        assert "sig.json" in result.output
    else:
        result = invoke("policy", "sign", policy, "--key", tmp_path / "none.pem")
    assert result.exit_code == 1 and result.output.startswith("error:")


def test_audit_verify_names_first_broken_record(tmp_path: Path) -> None:
    """`audit verify` exits 0 on an intact log and 1 naming the broken line otherwise."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        for i in range(3):
            audit.append(AuditKind.COMMIT, round=i)
    assert invoke("audit", "verify", path).exit_code == 0
    path.write_text(path.read_text().replace('"round":1', '"round":4'))
    broken = invoke("audit", "verify", path)
    assert broken.exit_code == 1 and f"{path}:2:" in broken.output.replace("\n", "")


def test_audit_repair_fixes_torn_tail(tmp_path: Path) -> None:
    """`audit repair` cuts a torn line, after which `audit verify` passes."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.append(AuditKind.COMMIT, round=0)
    with open(path, "ab") as f:
        f.write(b'{"seq":1')
    assert invoke("audit", "verify", path).exit_code == 1
    assert invoke("audit", "repair", path).exit_code == 0
    assert invoke("audit", "verify", path).exit_code == 0
