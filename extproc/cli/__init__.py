"""The `extproc` command line: every subcommand, thin over the packages that do the work."""
