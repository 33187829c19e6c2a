"""The exception type for invalid user input; the CLI prints it as one line, without a traceback."""


class UserError(ValueError):
    """Invalid input or a missing file; the message names the value and how to fix it."""
