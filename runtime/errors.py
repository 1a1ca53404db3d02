"""Errors that mean "the user asked for something we cannot do", as opposed to bugs.

The CLI and the server turn these into one clear line (exit code 2) or a 4xx answer; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class: the message is written for the person who ran the command."""


class ModelFolderError(UserError):
    """The model folder is missing, incomplete, or of a format this runtime does not read."""


class InvalidRequestError(UserError):
    """A generation parameter is out of range or malformed.

    `field` names the offending parameter so that an HTTP layer can point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class GenerationCancelled(UserError):
    """A callback or a cancel event stopped the run before its last step."""


class NonFiniteError(UserError):
    """The model produced NaN or infinite values: corrupt weights or an fp16 overflow, not the request."""


class OutOfMemoryError(UserError):
    """onnxruntime could not allocate memory for a run: the size or batch is too large for the device."""
