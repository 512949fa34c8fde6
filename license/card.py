"""The README.md model card: written and read with huggingface_hub's ModelCard / ModelCardData.

corral owns one block of the card body, between two HTML comments, and a few front-matter
fields; everything else an existing card says (its text, other fields, tags) is kept. The block
opens with the model name as the title and "Built with Llama", then states the license, the
Notice, the section 2 declaration and (multimodal models) the EU clause.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license import keys as K
from toolbox.errors import BadInputError

if TYPE_CHECKING:
    from license.stamp import Stamp

BEGIN = "<!-- corral:license:begin -->"
END = "<!-- corral:license:end -->"
MANAGED_FIELDS = ("license", "license_name", "license_link", "base_model", "base_model_relation", K.CARD_SECTION)
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n*", re.S)


@dataclass
class CardFacts:
    """What a model card says, as the audit needs it."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)
    body: str = ""
    error: str | None = None

    @property
    def title(self) -> str | None:
        return card_title(self.body)

    @property
    def corral(self) -> dict[str, Any]:
        section = self.data.get(K.CARD_SECTION)
        return section if isinstance(section, dict) else {}


def card_title(body: str) -> str | None:
    """The first level-1 heading outside code fences (the model name, by Hub convention)."""
    fenced = False
    for line in body.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("# "):
            return line[2:].strip()
    return None


def read_card(path: Path) -> CardFacts:
    """Parse README.md; a broken front matter is reported in `error`, not raised."""
    from huggingface_hub import ModelCard

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        card = ModelCard(text)
    except Exception as exc:  # huggingface_hub raises ValueError / yaml errors on bad front matter
        return CardFacts(path=path, body=text, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    return CardFacts(path=path, data=card.data.to_dict(), body=card.text)


def _split_existing(existing: str) -> tuple[dict[str, Any], str]:
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(existing)
    except Exception as exc:
        raise BadInputError(f"README.md front matter cannot be parsed ({type(exc).__name__})",
                            hint="fix the YAML between the --- lines, or move README.md away") from exc
    body = _BLOCK.sub("", card.text, count=1) if BEGIN in card.text else _drop_title(card.text)
    return card.data.to_dict(), body.strip("\n")


def _drop_title(body: str) -> str:
    """Remove the old title (corral's block brings the model name as the new one)."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            if line.startswith("# "):
                del lines[i]
            break
    return "\n".join(lines)


def build_card(stamp: Stamp, existing: str | None = None) -> str:
    """The model card for `stamp`, merged into `existing` card text when there is one."""
    from huggingface_hub import ModelCard, ModelCardData

    p = stamp.policy
    data, rest = _split_existing(existing) if existing else ({}, "")
    base_model = stamp.base_model or data.get("base_model")
    relation = stamp.relation or (data.get("base_model_relation") if not stamp.base_model else None)
    tags = list(dict.fromkeys([*(data.get("tags") or []), *stamp.all_tags()]))
    fields = {k: v for k, v in data.items() if k not in MANAGED_FIELDS and k != "tags"}
    fields.update(license=p.hub_license, license_link="LICENSE", tags=tags)
    if p.hub_license == "other":
        fields["license_name"] = p.hub_license_name
    if base_model:
        fields["base_model"] = base_model
        if relation:
            fields["base_model_relation"] = relation
    fields[K.CARD_SECTION] = {K.CARD_POLICY: p.id, K.CARD_MODEL_NAME: stamp.name,
                              K.CARD_DECLARATION: str(stamp.declaration), K.CARD_MULTIMODAL: stamp.multimodal}
    card_data = ModelCardData(**fields)
    body = _block(stamp, base_model if isinstance(base_model, str) else None, relation)
    text = f"---\n{card_data.to_yaml()}\n---\n\n{body}\n" + (f"\n{rest}\n" if rest.strip() else "")
    return str(ModelCard(text))


def _block(stamp: Stamp, base_model: str | None, relation: str | None) -> str:
    p = stamp.policy
    origin = ""
    if base_model:
        kind = {"finetune": "a fine-tune of", "quantized": "a quantized version of", "merge": "a merge based on",
                "adapter": "an adapter for"}.get(relation or "", "derived from")
        origin = f", {kind} [{base_model}](https://huggingface.co/{base_model})"
    lines = [
        BEGIN,
        f"# {stamp.name}",
        "",
        f"**{p.attribution}**",
        "",
        f"{stamp.name} is a {p.family} model{origin}. It is distributed under the "
        f"[{p.display_name}](LICENSE) ({p.license_url}), and its use must comply with the "
        f"[{p.family} Acceptable Use Policy](USE_POLICY.md) ({p.use_policy_url}).",
        "",
        f"> {p.notice}",
        "",
        f"**Monthly active users (license section {p.clause('threshold')}).** Declared: "
        f"{stamp.declaration.describe()} (`{stamp.declaration}`). corral records this declaration; "
        "it does not know or check anyone's user count.",
    ]
    if stamp.multimodal and p.multimodal_restriction:
        lines += ["", f"**Multimodal model: restriction in the European Union ({p.family} Acceptable Use Policy).**",
                  "", f"> {p.multimodal_restriction}"]
    lines += ["", f"<details><summary>Provenance (written by corral {stamp.provenance.corral_version})</summary>",
              "", "```json", json.dumps(stamp.provenance_dict(), indent=2, sort_keys=True, ensure_ascii=False),
              "```", "", "</details>", END]
    return "\n".join(lines)
