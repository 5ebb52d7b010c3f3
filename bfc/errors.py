"""User-facing errors. Every message says what is wrong, where, and what to do."""


class BfcError(Exception):
    """Base class of every error bfc raises on purpose."""


class InvalidInputError(BfcError, ValueError):
    """An array, shape or argument given to the API is unusable."""


class ChainError(InvalidInputError):
    """A KS chain is invalid, not chainable, or does not match a matrix."""


class ConfigError(InvalidInputError):
    """A configuration value is out of its allowed set or range."""


class ModelError(BfcError):
    """An ONNX model cannot be loaded, checked or written."""


class UnsupportedError(BfcError):
    """A well-formed input uses a form bfc does not handle."""


class NativeLibraryError(BfcError):
    """The ai.bfc custom-op library is missing or failed to load."""
