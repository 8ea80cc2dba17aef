"""`tops-job aws …`: the plugin's own commands."""

from __future__ import annotations

import json
import os

import click

from .settings import KMS_KEY_ID


@click.group()
def aws() -> None:
    """AWS plugin (tops-job-aws): KMS signer, S3 outbox, S3 profile cache and summaries."""


@aws.command("key")
@click.option("--key-id", envvar=KMS_KEY_ID, required=True, help=f"KMS key id, ARN or alias ({KMS_KEY_ID}).")
def key(key_id: str) -> None:
    """Print the KMS key's public key, address and DID (register this DID for the device)."""
    from tops_job import default_did, eth_address

    from .kms import KmsSigner

    public = KmsSigner.from_environment(key_id).public_key  # errors: tops-job's CLI reports them
    click.echo(json.dumps({"key_id": key_id, "pubkey": public.hex(), "address": eth_address(public),
                           "did": os.environ.get("DEVICE_DID") or default_did(public)}, indent=2))
