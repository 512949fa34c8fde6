"""The license gate of `corral download`: Llama weights move only after their license is accepted.

A repository is a Llama repository when its id contains "llama" or its card declares a Llama
license. The first download shows the summary (from license/policies, the same data the stamps
use) and proceeds only with `accept_license=True` or CORRAL_ACCEPT_LLAMA_LICENSE=1; the
acceptance is recorded under the corral cache so the same repository does not ask again, and
goes into the manifest.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from toolbox.errors import LicensePolicyError
from toolbox.hub.manifest import LicenseAcceptance

ACCEPT_ENV = "CORRAL_ACCEPT_LLAMA_LICENSE"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class LicenseInfo:
    """What the repository card declares and which corral policy (if any) governs the download."""

    hub_license: str | None
    hub_license_name: str | None
    policy_id: str | None  # None: not a Llama repository, no gate
    display_name: str | None
    summary: str | None


class LicenseNotAcceptedError(LicensePolicyError):
    """A Llama repository's first download without acceptance; carries the summary to show."""

    def __init__(self, message: str, *, hint: str, summary: str) -> None:
        super().__init__(message, hint=hint)
        self.summary = summary


def _version_policy(repo_id: str) -> str | None:
    """The policy id a repository name implies: Llama-4-* -> llama4, Llama-3.1-* -> llama3_1."""
    m = re.search(r"llama[-_ ]?(\d)(?:[._-](\d))?", repo_id, re.I)
    if not m:
        return None
    return f"llama{m.group(1)}" + (f"_{m.group(2)}" if m.group(2) and m.group(1) != "4" else "")


def license_info(repo_id: str, card: dict[str, object] | None) -> LicenseInfo:
    """Decide whether the license gate applies and build the summary from the policy data."""
    from license.policy import DEFAULT_POLICY, load_policy, policy_for_label, policy_ids

    card = card or {}
    label = card.get("license")
    name = card.get("license_name")
    label = label if isinstance(label, str) else None
    name = name if isinstance(name, str) else None
    policy = policy_for_label(label, name) or policy_for_label(name)
    declared_llama = any(v is not None and v.strip().lower().startswith("llama") for v in (label, name))
    if policy is None and not declared_llama and "llama" not in repo_id.lower():
        return LicenseInfo(label, name, None, None, None)
    if policy is None:
        implied = _version_policy(repo_id)
        policy = load_policy(implied if implied in policy_ids() else DEFAULT_POLICY)
    return LicenseInfo(label, name, policy.id, policy.display_name, _summary(policy))


def _summary(policy: object) -> str:
    from license.policy import LicensePolicy

    assert isinstance(policy, LicensePolicy)
    lines = [
        f"{policy.display_name} ({policy.license_url})",
        f"- More than {policy.threshold_words} on the release date requires a separate license from Meta "
        f"(section {policy.clause('threshold')}).",
        f"- Use must follow the Acceptable Use Policy: {policy.use_policy_url}",
        f'- Redistributing the model or a derivative: include the agreement, display "{policy.attribution}", '
        f'start the model name with "{policy.name_prefix}", ship the notice.',
    ]
    if policy.multimodal_restriction:
        lines.append(f"- Multimodal models: {policy.multimodal_restriction}")
    return "\n".join(lines)


def _record_path(cache: Path, repo_id: str) -> Path:
    return cache / "licenses" / (repo_id.replace("/", "--") + ".json")


def _now() -> str:
    """SOURCE_DATE_EPOCH when set (reproducible outputs), else the wall clock, as ISO 8601 UTC."""
    from license.stamp import _source_date

    return _source_date() or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def recorded_acceptance(cache: Path, repo_id: str, policy_id: str) -> LicenseAcceptance | None:
    """An earlier acceptance of this repository's license, or None (unreadable records count as none)."""
    try:
        data = json.loads(_record_path(cache, repo_id).read_text(encoding="utf-8"))
        acceptance = LicenseAcceptance.model_validate(data["acceptance"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return acceptance if acceptance.policy == policy_id else None


def gate(repo_id: str, info: LicenseInfo, *, accept_license: bool, cache: Path,
         dry_run: bool = False) -> tuple[LicenseAcceptance | None, bool]:
    """The acceptance under which the download may proceed, and whether it is new.

    (None, False) for a repository without a Llama license or in a dry run without acceptance;
    LicenseNotAcceptedError (exit 5) when a Llama repository has none.
    """
    if info.policy_id is None or info.display_name is None:
        return None, False
    earlier = recorded_acceptance(cache, repo_id, info.policy_id)
    if earlier is not None:
        return earlier, False
    via = "accept_license" if accept_license else (
        ACCEPT_ENV if os.environ.get(ACCEPT_ENV, "").strip().lower() in _TRUE else None)
    if via is None:
        if dry_run:
            return None, False
        raise LicenseNotAcceptedError(
            f"{repo_id} is under the {info.display_name}; downloading it requires accepting it first",
            hint=f"read the summary above, then re-run with --accept-license (or set {ACCEPT_ENV}=1 in CI)",
            summary=info.summary or "",
        )
    acceptance = LicenseAcceptance(policy=info.policy_id, name=info.display_name, accepted_by=_user(),
                                   accepted_at=_now(), via=via)
    if not dry_run:
        _write_record(cache, repo_id, acceptance)
    return acceptance, True


def _write_record(cache: Path, repo_id: str, acceptance: LicenseAcceptance) -> None:
    """Record the acceptance (atomically) so later downloads of the repository do not ask again."""
    from toolbox import __version__
    from toolbox.tensors.atomic import atomic_file

    record = {"repo_id": repo_id, "acceptance": acceptance.model_dump(mode="json"), "corral_version": __version__}
    with atomic_file(_record_path(cache, repo_id), force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
