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


@app.command()
def rotate(
    old_key: Path = typer.Option(..., "--old-key", help="The current private key (signing.key): it signs the "
                                 "announcement devices check."),
    new_pub: Path = typer.Option(..., "--new-pub", help="The new public key (signing.pub of `flywheel keys "
                                 "generate --out new-keys/`)."),
    overlap_days: float = typer.Option(7.0, "--overlap-days", min=0.0, help="How long models signed by the old key "
                                       "still count, so the fleet can move to models signed by the new one."),
    hub: str | None = typer.Option(None, "--hub", help="Post the announcement to this hub (else print it)."),
    token: str | None = typer.Option(None, "--token", envvar="FLYWHEEL_HUB_ADMIN_TOKEN", help="An admin token."),
) -> None:
    """Announce a new fleet key under the old one: devices trust the new key at once and the old key's model
    signatures only for --overlap-days (fleet.hub.keys). Sign models with the new key from now on."""
    import time

    import httpx

    from fleet.errors import FlywheelError, error_for_response
    from fleet.protocol import KeyRotation
    from fleet.signing import key_id, load_private_key, sign_rotation

    try:
        now = time.time()
        rotation = sign_rotation(load_private_key(old_key), new_pub.read_text().strip(),
                                 old_key_until=now + overlap_days * 86400.0, issued_at=now)
    except (OSError, FlywheelError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if hub is None:
        typer.echo(rotation.to_json())
        return
    if not token:
        raise typer.BadParameter("--hub needs an admin token (--token or FLYWHEEL_HUB_ADMIN_TOKEN)")
    r = httpx.post(hub.rstrip("/") + "/v1/keys/rotations", content=rotation.to_json(), timeout=30,
                   headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    err = error_for_response(r, "POST /v1/keys/rotations")
    if err is not None:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    got = KeyRotation.from_json(r.content)
    typer.echo(f"fleet key {got.old_key_id} -> {key_id(got.new_public_key)}; models signed by {got.old_key_id} "
               f"count until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(got.old_key_until))}")
