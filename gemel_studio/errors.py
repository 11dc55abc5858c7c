"""Errors a user can cause. Each carries one line that names the problem and the fix."""


class GemelError(Exception):
    """A problem with the user's input: shown as one line, exit code 2, never a traceback."""

    exit_code = 2


class ProcessFailed(GemelError):
    """Work on another process ended for a reason that is not the user's input (it was killed,
    crashed or met a bug): shown as one line too, with exit code 1, or 128 + N when a signal N
    stopped it (as a shell reports a process a signal ended)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class WorkloadError(GemelError):
    """A workload file is missing, unreadable or does not fit the schema."""


class ModelLoadError(GemelError):
    """A model's source (architecture, weights, checkpoint, TorchScript, ONNX) cannot be used."""


class DatasetError(GemelError):
    """A dataset that cannot be read or does not fit its model."""


class Cancelled(Exception):
    """Long work stopped because the caller asked it to (not an error)."""


def user_message(exc: BaseException) -> str | None:
    """The one line `gemel` prints for an error of the user's (a GemelError, or a file that
    cannot be read or written), or None for any other error."""
    if isinstance(exc, GemelError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc} (check the path and its permissions)"
    return None
