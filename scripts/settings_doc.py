"""Write docs/SETTINGS.md from the settings' declarations (pipeline/config.py and each method's sections)."""

from pathlib import Path

import pipeline.trainers  # noqa: F401  (registers the methods' sections)
from pipeline.config import settings_markdown

out = Path(__file__).resolve().parents[1] / "docs" / "SETTINGS.md"
out.write_text(settings_markdown() + "\n")
print(f"wrote {out}")
