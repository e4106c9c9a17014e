"""User-facing errors: each carries a one-line message the CLI prints without a traceback."""


class JaxServeError(Exception):
    """Base class for errors caused by user input (files, arguments, prompts)."""


class CheckpointError(JaxServeError):
    """A checkpoint is missing, corrupt, or does not match its config."""


class UnsupportedModelError(JaxServeError):
    """The checkpoint describes an architecture or feature jaxserve does not implement."""


class InvalidRequestError(JaxServeError, ValueError):
    """A prompt or sampling parameter is invalid; the message names the field."""
