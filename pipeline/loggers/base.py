"""Where a run's curves go besides RUN/metrics.jsonl: TensorBoard, Weights & Biases, CSV (`run.loggers`).

metrics.jsonl is always written: resume, reports and experiments read it. Every other logger receives the same
records as they are written, and the evaluations of the run's checkpoints:

    LOGGERS = Registry("logger")          a logger is a class registered by name (one module each)
    RunLoggers(run_dir, config, names)    the loggers a run's config names; .log(record, step), .evaluation(result)

A record becomes scalars in one section (`series`): steps under train/, epochs under epoch/, selection rounds
under selection/ (size, overlap with the last round, wall time, stall, RD(U)), other records under their kind.
Every section is plotted against the trainer's global step, so that a resumed run can hide what it redoes
(TensorBoard's purge_step). Loggers whose library is missing fail at the start of the run, with the install
command; a logger that fails while training is reported once and switched off, never stopping the run.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.progress import console
from pipeline.registry import Registry

LOGGERS: Registry = Registry("logger", flag="run.loggers")
ALWAYS = "jsonl"
SECTIONS = {"step": "train", "epoch": "epoch", "selection": "selection"}
_NOT_SCALARS = {"kind", "time"}


def series(record: dict) -> tuple[str, dict[str, float]]:
    """(section, {name: number}) of one metrics.jsonl record: its numeric fields (booleans as 0/1)."""
    section = SECTIONS.get(record.get("kind"), str(record.get("kind", "other")))
    values = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or value is None or isinstance(value, (str, list, dict)):
            continue
        if isinstance(value, (bool, int, float)):
            values[key] = float(value)
    return section, values


def flat_settings(config: dict) -> dict:
    """A run's config as one level of `section.key` values (hyper-parameter tables take no nesting)."""
    out = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
        else:
            out[section] = values if isinstance(values, (bool, int, float, str)) else str(values)
    return out


def evaluation_scalars(result: dict) -> dict[str, float]:
    """The accuracies of one evaluation (`pipeline eval`'s result), under eval/PROTOCOL-MEASURE names."""
    measures = result.get("measures") or []
    tag = result.get("protocol", "eval")
    if result.get("branch_role", "eval") != "eval":
        tag += f"-{result['branch_role']}"
    return {f"eval/{tag}-{m}": float(result[m]) for m in measures if isinstance(result.get(m), (int, float))}


class Logger:
    """One destination. `run_dir`: the run folder; `config`: its settings as a dict; `resume_step`: the global
    step a resumed run goes on from (None for a new run)."""

    name = "base"
    library: str | None = None  # the module the logger needs (an extra), imported by `require`

    @classmethod
    def require(cls):
        """The logger's library, imported; the one-line error (`missing`) when it does not import."""
        if cls.library is None:
            return None
        try:
            return importlib.import_module(cls.library)
        except ImportError as exc:
            raise missing(cls.name, "loggers", exc) from None

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None = None):
        self.run_dir, self.config, self.resume_step = Path(run_dir), config, resume_step

    def log(self, record: dict, step: int) -> None:
        raise NotImplementedError

    def evaluation(self, result: dict, step: int) -> None:
        """Accuracies of a checkpoint of the run, with the run's settings (hyper-parameters, summary)."""

    def close(self) -> None:
        pass


def check_loggers(names) -> list[str]:
    """The names, with jsonl first; one line naming run.loggers and the choices for an unknown one."""
    names = list(dict.fromkeys([ALWAYS, *names]))
    for name in names:
        if name != ALWAYS:
            LOGGERS.lookup(name).require()
    return names


class RunLoggers:
    """The loggers of one run, fed by the trainer (records) and by `pipeline eval` (evaluations)."""

    def __init__(self, run_dir: Path, config: dict, names, resume_step: int | None = None):
        self.loggers: list[Logger] = []
        for name in check_loggers(names):
            if name != ALWAYS:  # metrics.jsonl is the trainer's own file
                self.loggers.append(LOGGERS[name](Path(run_dir), config, resume_step))

    def _each(self, call) -> None:
        for logger in list(self.loggers):
            try:
                call(logger)
            except Exception as exc:  # a logger's failure never stops training; said once
                console.print(f"[yellow]run.loggers: {logger.name} failed ({type(exc).__name__}: {exc}); it is "
                              "switched off for the rest of this run (metrics.jsonl has every record)[/]")
                self.loggers.remove(logger)

    def log(self, record: dict, step: int) -> None:
        self._each(lambda lg: lg.log(record, step))

    def evaluation(self, result: dict, step: int) -> None:
        self._each(lambda lg: lg.evaluation(result, step))

    def close(self) -> None:
        self._each(lambda lg: lg.close())
        self.loggers = []


def missing(name: str, extra: str, exc: Exception) -> PipelineError:
    return PipelineError(f"run.loggers: {name} needs its library ({exc}); install it with pip install "
                         f"'pipeline[{extra}]', or remove {name!r} from run.loggers")
