"""Errors the CLI reports as `error: <message>` with exit code 2 (the user's input is at fault)."""


class ExportError(Exception):
    """A problem with the checkpoint or the command line, not a bug: unsupported architecture,
    missing or corrupt files, state-dict keys that do not match the config, bad options."""
