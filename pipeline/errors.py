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

    def __init__(self, path, reason: str, appending: bool = False):
        self.path, self.reason, self.appending = str(path), reason, appending
        kept = "the lines already in it are kept" if appending else "nothing there was changed"
        super().__init__(f"{path}: could not be written ({reason}); {kept}. Free space on that disk, check its "
                         "permissions, or choose another output folder (a shorter name, if too long)")

    def __reduce__(self):  # crosses process pools (prepare's encoders) intact
        return type(self), (self.path, self.reason, self.appending)


class user_code:
    """`with user_code("importing plugin 'x'", "fix it or remove it from PIPELINE_PLUGINS"):` around code of the
    user's own (a plugin, a model factory, an entry point): whatever it raises, SystemExit included, becomes one
    PipelineError line naming the step and the fix (its message cut at 300 characters); a PipelineError passes
    through as it is."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, KeyboardInterrupt):
            return False
        if isinstance(exc, PipelineError):  # already one line of ours (a taken name, a check of the step)
            return False
        if isinstance(exc, (Exception, SystemExit)):
            why = f"exited with code {exc.code!r}" if isinstance(exc, SystemExit) else \
                f"{type(exc).__name__}: {str(exc)[:300]}"
            raise PipelineError(f"{self.what} failed ({why}); {self.fix}") from None
        return False

