"""`pipeline experiment`: what an experiment file says (`spec`), running its arms (`run`), its tables (`table`)."""

from pipeline.experiment.run import _training, run_experiment
from pipeline.experiment.spec import STATE, Arm, Experiment, arm_config, certify_spec, load_experiment
from pipeline.experiment.table import measure_columns, results_markdown, summarize, write_results

__all__ = ["Arm", "Experiment", "STATE", "_training", "arm_config", "certify_spec", "load_experiment",
           "measure_columns", "results_markdown", "run_experiment", "summarize", "write_results"]
