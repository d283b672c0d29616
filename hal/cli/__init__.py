"""The `twincache` command line: `python -m hal.cli` or the console script."""
