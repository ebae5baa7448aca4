"""``syncdevice``: the device agent's command line."""

from __future__ import annotations

import sys

import click

from proto import PROTOCOL_VERSION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="syncnode",
                      message=f"%(prog)s %(version)s (wire protocol v{PROTOCOL_VERSION})")
def cli() -> None:
    """syncdevice: edit end-to-end encrypted documents offline and sync them via syncnodes.

    The device keeps the keys and the documents; syncnodes only ever see ciphertext.
    """


@cli.command()
def selfcheck() -> None:
    """Check that this machine can run a device: MLS, CRDT and iroh bindings."""
    from syncnode.selfcheck import run

    click.echo("syncdevice selfcheck")
    if not run(click.echo):
        sys.exit(1)
    click.echo("all checks passed")


def main() -> None:
    cli()
