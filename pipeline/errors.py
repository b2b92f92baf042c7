"""The one exception type a user sees: a message naming the file and the fix, never a traceback."""


class PipelineError(Exception):
    """Bad input or a broken artefact. The CLI prints the message and exits non-zero."""

    exit_code = 2


class DataError(PipelineError):
    """An artefact on disk (shard, index, manifest) is missing, corrupt or does not fit."""

    exit_code = 1
