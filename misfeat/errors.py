"""The error misfeat raises for bad input: its message names the problem and the fix.

The CLI prints these as one line, without a traceback; anything else is a bug and
keeps its traceback.
"""


class MisfeatError(ValueError):
    """Bad input or state a user can fix (unknown hook, malformed file, mismatched resume...)."""


class PromptFileError(MisfeatError):
    """A prompt file or record is malformed; the message names the file, line and problem."""
