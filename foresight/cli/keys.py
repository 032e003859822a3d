"""Governance commands: ``keys init`` (an Ed25519 signing key pair), ``registry verify`` (re-check a release
registry: hash chain, signatures, released files) and ``registry trust`` (pin another public key).

JSON keys (``--json``, the last stdout line):

- ``keys init``: ``private_key``, ``public_key`` (paths), ``key_id``.
- ``registry verify``: ``registry``, ``ok``, ``records``, ``releases``, ``trusted_keys``, ``head`` (the last
  record's hash: keep it elsewhere to detect a rollback), ``broken`` (``{index, line, reason}`` of the first record
  that does not hold, or null), ``problems``, ``warnings``. Exit 1 when ``ok`` is false.
- ``registry trust``: ``registry``, ``key_id``, ``already_trusted``, ``seq``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from foresight.cli.app import JsonOption, emit, err, fail
from privacy import signing
from privacy.registry import RegistryError, trust_key
from privacy.verify import verify_registry

keys_app = typer.Typer(help="Signing keys for audit reports, approvals and releases (Ed25519).",
                       no_args_is_help=True)
registry_app = typer.Typer(help="The release registry: verify its hash chain, signatures and files; trust a key.",
                           no_args_is_help=True)
RegistryOption = Annotated[Path, typer.Option("--registry", help="Release registry folder.")]


def keys_init(
    out: Annotated[Path, typer.Option("--out", help="Folder for signing.key (mode 0600) and signing.pub.")],
    as_json: JsonOption = False,
) -> None:
    """Create an Ed25519 key pair: OUT/signing.key (private; never overwritten) and OUT/signing.pub (give this one
    to whoever verifies, e.g. `foresight release --public-key`)."""
    try:
        made = signing.init_keys(out)
    except (signing.KeyFileError, OSError) as exc:
        fail(str(exc))
    emit(made, as_json, f"key {made['key_id'][:16]}: private {made['private_key']} (keep it to yourself), "
                        f"public {made['public_key']}")


def verify(
    registry: RegistryOption,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="Trust only this public key (a copy held outside the registry) instead of the keys "
                             "the registry pins.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-check a release registry: the index's hash chain, every signature (records, audits, approvals) and the
    released files' checksums. Exit 1 naming the first broken record when anything does not hold."""
    try:
        res = verify_registry(registry, public_key=public_key)
    except (RegistryError, signing.KeyFileError, OSError) as exc:
        fail(str(exc))
    if not res["ok"]:  # every problem is in --json; the error line names the first
        emit(res, as_json)
        b, more = res["broken"], len(res["problems"]) - 1
        fail(f"registry {registry}: record {b['index']} (line {b['line']}) is broken: {b['reason']}"
             + (f" (and {more} more problem(s): --json lists them)" if more else ""), code=1)
    for w in res["warnings"]:
        err.print(Text(f"  warning: record {w['index']}: {w['warning']}"))
    emit(res, as_json, f"registry {registry}: {res['records']} records ({res['releases']} releases) verified; "
                       f"head {res['head'][:16]}")


def trust(
    registry: RegistryOption,
    public_key: Annotated[Path, typer.Option("--public-key", help="The public key (.pub) to trust.")],
    signing_key: Annotated[Path | None, typer.Option(
        "--signing-key", help="A private key the registry already trusts: required once it trusts any.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Pin a public key in the registry (a record in its hash chain) so releases signed with it are accepted."""
    try:
        res = trust_key(registry, public_key, signing_key)
    except (RegistryError, signing.SignatureError, signing.KeyFileError, OSError) as exc:
        fail(str(exc))
    emit(res, as_json, f"registry {registry}: key {res['key_id'][:16]} "
                       + ("was already trusted" if res["already_trusted"] else "is now trusted"))
