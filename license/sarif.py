"""SARIF 2.1.0 for `corral license check --format sarif`, the subset code scanning reads.

One rule per finding code (with its clause and the fix as help), one result per finding with a
level, a message, and a location that points at the file (a region with at least a start line,
which GitHub code scanning requires), plus a stable fingerprint so re-runs match old alerts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from license.audit import AuditReport

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {"error": "error", "warning": "warning"}


def _uri(path: str) -> str:
    """A path relative to the working directory when it is under it (what code scanning expects), else file://."""
    p = Path(path).absolute()
    try:
        return p.relative_to(Path(os.getcwd())).as_posix()
    except ValueError:
        return p.as_uri()


def to_sarif(report: AuditReport) -> dict[str, Any]:
    from license.audit import RULES
    from license.policy import load_policy
    from toolbox import __version__

    policy = load_policy(report.policy) if report.policy else None
    codes = list(dict.fromkeys(f.code for f in report.findings))
    rules = []
    for code in codes:
        rule = RULES[code]
        clause = policy.clause(rule.clause_key) if policy else ""
        example = next(f for f in report.findings if f.code == code)
        rules.append({
            "id": code,
            "name": "".join(part.capitalize() for part in code.split("-")),
            "shortDescription": {"text": rule.title},
            "fullDescription": {"text": f"{rule.title} ({policy.display_name if policy else 'Llama license'}, "
                                        f"section {clause})."},
            "help": {"text": example.fix},
            "defaultConfiguration": {"level": LEVELS[rule.severity]},
            "properties": {"clause": clause, "tags": ["license", "compliance", "llama"]},
        })
    index = {code: i for i, code in enumerate(codes)}
    results = []
    for f in report.findings:
        uri = _uri(f.path)
        fingerprint = hashlib.sha256(f"{f.code}|{uri}|{f.message}".encode()).hexdigest()[:32]
        results.append({
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": LEVELS[f.severity],
            "message": {"text": f"{f.message}. Fix: {f.fix}. (license section {f.clause})"},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri},
                                                "region": {"startLine": f.line or 1}}}],
            "partialFingerprints": {"corralFinding/v1": fingerprint},
            "properties": {"clause": f.clause},
        })
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "corral-license", "version": __version__,
                                "semanticVersion": __version__, "rules": rules}},
            "results": results,
            "properties": {"artifact": report.path, "policy": report.policy, "compliant": report.ok},
        }],
    }
