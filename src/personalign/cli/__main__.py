"""``python -m personalign.cli``: the same command line as ``personalign``."""

from personalign.cli import main

main()
