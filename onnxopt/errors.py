"""User-facing errors: one line that says what is wrong and what to do."""


class OnnxoptError(Exception):
    """An error caused by the user's input. The CLI prints its message alone, without a traceback."""
