"""User-facing errors: the CLI prints these as one line, without a traceback."""


class FmstackError(Exception):
    """Base class for errors caused by user input (files, arguments, models)."""


class CheckpointError(FmstackError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model."""


class ConfigError(FmstackError):
    """A model configuration is invalid or names an unknown architecture."""


class TokenizerError(FmstackError):
    """No usable tokenizer could be built from the given files."""


class ParameterError(FmstackError, ValueError):
    """A user-supplied parameter is out of range; the message names it and what is allowed.

    Library code that names a field (`field`, with the rejected `value` and what is `allowed`) lets
    a front end restate the error in its own terms (the CLI says `--max-new-tokens -1`)."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None, allowed: str | None = None):
        super().__init__(message)
        self.field, self.value, self.allowed = field, value, allowed
