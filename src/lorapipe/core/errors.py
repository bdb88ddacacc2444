"""User-facing errors: caught by the CLI and printed as one clear message (no traceback)."""


class LorapipeError(RuntimeError):
    """Bad input or environment; the message says what and where (file:line or params key)."""
