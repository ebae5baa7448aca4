"""``python -m syncnode`` = the ``syncnode`` command."""

from syncnode.cli import main

main()
