"""The one exception type a user sees: a message naming the file and the fix, never a traceback."""


class PipelineError(Exception):
    """Bad input or a broken artefact. The CLI prints the message and exits non-zero."""

    exit_code = 2


class DataError(PipelineError):
    """An artefact on disk (shard, index, manifest) is missing, corrupt or does not fit."""

    exit_code = 1


class WriteError(PipelineError):
    """A file could not be written (no space left, name too long, read-only, ...): the previous state is kept."""

    exit_code = 1

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: could not be written ({reason}); nothing there was changed. Free space on that "
                         "disk, check its permissions, or choose another output folder (a shorter name, if too long)")

    def __reduce__(self):  # crosses process pools (prepare's encoders) intact
        return type(self), (self.path, self.reason)
