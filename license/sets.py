"""The license package's closed sets, in a module that imports nothing heavy: the CLI reads them at
start-up for its choices (which must not import pydantic or license.stamp), and license.stamp and
license.policy use the same definitions."""

from __future__ import annotations

from importlib import resources

RELATIONS: tuple[str, ...] = ("finetune", "quantized", "merge", "adapter")  # how an output derives from its base


def policy_ids() -> list[str]:
    """The shipped policy ids: one `policies/ID.yaml` file each."""
    return sorted(p.name[: -len(".yaml")] for p in (resources.files("license") / "policies").iterdir()
                  if p.name.endswith(".yaml"))
