"""The command line (`main`), the jobs it runs (`jobs`: quantize, eval, analyze) and the HTML demo (`demo`)."""

from workbench.cli.commands import main

__all__ = ["main"]
