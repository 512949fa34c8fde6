"""`corral report`: one self-contained HTML page (or the charts alone, or their data as JSON) about artifacts
and the saved JSON of corral's commands.

`collect.py` reads the inputs (what each one is, by its content) into one JSON-ready document, `charts.py`
draws it with matplotlib (deterministic SVG: a rebuilt report is byte-identical), `html.py` writes the
page. `build_report` is the library entry point the CLI command and the recipe step call.
"""

from __future__ import annotations

REPORT_FORMATS = ("html", "svg", "png")
