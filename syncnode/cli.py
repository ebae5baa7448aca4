"""``syncnode``: the daemon and operator tools."""

from __future__ import annotations

import sys

import click

from proto import PROTOCOL_VERSION


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="syncnode",
                      message=f"%(prog)s %(version)s (wire protocol v{PROTOCOL_VERSION})")
def cli() -> None:
    """syncnode: an untrusted relay and Paxos acceptor for end-to-end encrypted documents.

    A syncnode stores and relays MLS-encrypted messages for the documents that name it and
    orders their commits together with the other syncnodes of each document. It never sees
    plaintext.
    """


@cli.command()
def selfcheck() -> None:
    """Check the installed stack: native bindings (MLS, CRDT) and an iroh loopback exchange."""
    from syncnode.selfcheck import run

    click.echo("syncnode selfcheck")
    if not run(click.echo):
        click.echo("selfcheck FAILED", err=True)
        sys.exit(1)
    click.echo("all checks passed")


def main() -> None:
    cli()
