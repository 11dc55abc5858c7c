"""Errors a user can cause. Each carries one line that names the problem and the fix."""


class GemelError(Exception):
    """A problem with the user's input: shown as one line, exit code 2, never a traceback."""


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
