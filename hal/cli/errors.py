"""The two errors every command group raises: their own module, so a group (board.cli, vm.cli)
needs nothing of the command line that loads it, and no import goes round in a loop."""


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit status 2."""


class CommandFailed(Exception):
    """The operation could not be done: printed without a traceback, exit status 1."""
