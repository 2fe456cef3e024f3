"""The project's user-facing errors: one-line messages, caught once at the CLI boundary."""


class ImagicError(Exception):
    """A problem with what the user gave: reported as one line, never as a traceback."""


class ImageInputError(ImagicError):
    """The input image cannot be read or is unsafe to decode."""


class ModelLoadError(ImagicError):
    """The model cannot be found or loaded."""


class TextInputError(ImagicError):
    """The target text is empty or unusable."""


class StateMismatchError(ImagicError):
    """An edit state file does not belong to this model, or is not a state file."""


class OutputExistsError(ImagicError):
    """Writing would overwrite an existing output."""


class OutputError(ImagicError):
    """An output cannot be written: a folder that is a file, a read-only place, a name too long."""


class ExportError(ImagicError):
    """An edit cannot be exported: it holds no fine-tuned weights, or no export is defined for its model family."""


class TrainingDivergedError(ImagicError):
    """The loss became NaN or infinite; `partial_state` holds what finished before it."""

    def __init__(self, message: str, partial_state=None):
        super().__init__(message)
        self.partial_state = partial_state


class TrainingInterrupted(ImagicError):
    """The user pressed Ctrl-C during training; `partial_state` holds what finished before it."""

    def __init__(self, message: str, partial_state=None):
        super().__init__(message)
        self.partial_state = partial_state


class SamplingError(ImagicError):
    """Sampling gave no picture: NaN, or one colour everywhere (what overflowing numbers give)."""


class SettingsError(ImagicError):
    """A setting is out of range or not one of the choices."""


class ClusterError(ImagicError):
    """Ray cannot be started here, or the cluster at an address cannot be reached or refuses this machine's token."""


class BatchIncomplete(ImagicError):
    """Some edits of a batch failed; each was reported as it happened, and the others were done."""
