"""The one exception type users see: a clear message, no traceback, a non-zero exit from the CLI."""


class ScratchLMError(Exception):
    """Bad input or a failed step, with a message that names the file, the field and what was expected."""
