"""The `extproc` command line: every subcommand, thin over the packages that do the work.

The top of the layers: may import any package; nothing imports it.
"""
