"""The error the command line reports as `exo: <message>` (exit status 2) instead of a traceback."""


class CliError(Exception):
    """A problem with the command line or the environment, reported without a traceback."""
