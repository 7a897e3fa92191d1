"""``flywheel keys``: generate the fleet's ed25519 signing key pair."""

from __future__ import annotations

from pathlib import Path

import typer

from fleet.errors import InvalidInput
from fleet.signing import generate_keypair, write_keypair

app = typer.Typer(help="Manage the fleet's model-signing keys.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Manage the fleet's model-signing keys."""


@app.command()
def generate(
    out: Path = typer.Option(Path("keys"), "--out", "-o", help="Folder for signing.key and signing.pub."),
) -> None:
    """Write a fresh key pair; the public half is what devices pin at enrollment."""
    pair = generate_keypair()
    try:
        priv, pub = write_keypair(pair, out)
    except InvalidInput as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"private key: {priv} (keep secret)\npublic key:  {pub}  id {pair.key_id}\n{pair.public_b64}")
