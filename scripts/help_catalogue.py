"""Write pipeline/help_catalogue.json: the names and settings texts the commands' help lists, read from the
live registries, so that `pipeline COMMAND --help` answers without importing torch (tests keep it current)."""

import json

from pipeline.cli import HELP_CATALOGUE, help_catalogue

HELP_CATALOGUE.write_text(json.dumps(help_catalogue(), indent=1, sort_keys=True) + "\n")
print(f"wrote {HELP_CATALOGUE}")
