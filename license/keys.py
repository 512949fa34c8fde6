"""The one metadata key namespace corral uses in every format (safetensors `__metadata__`,
GGUF KV, ONNX `metadata_props`), so a lone file of any format carries the same facts under
the same names. Values are strings everywhere (safetensors allows nothing else).

GGUF additionally gets the standard `general.*` keys (`GENERAL_*` below), which llama.cpp and
the Hub read; the model card gets the Hub's own fields plus a `corral:` mapping (`CARD_*`).
"""

from __future__ import annotations

POLICY = "corral.license.policy"  # policy id: llama4
LICENSE_NAME = "corral.license.name"  # Llama 4 Community License Agreement
LICENSE_LINK = "corral.license.link"  # URL of the agreement
NOTICE = "corral.license.notice"  # the exact Notice sentence (1.b.iii)
ATTRIBUTION = "corral.license.attribution"  # "Built with Llama" (1.b.i(B))
USE_POLICY = "corral.license.use_policy"  # Acceptable Use Policy URL (1.b.iv)
DECLARATION = "corral.license.mau_declaration"  # below-700m | meta-license:REFERENCE (section 2)
MULTIMODAL_RESTRICTION = "corral.license.multimodal_restriction"  # the AUP's EU clause (multimodal only)
MODEL_NAME = "corral.model.name"  # begins with "Llama" (1.b.i)
MULTIMODAL = "corral.model.multimodal"  # "true" | "false"
BASE_MODEL = "corral.base_model.repo"  # Hub repo id of the base model
BASE_REVISION = "corral.base_model.revision"
BASE_RELATION = "corral.base_model.relation"  # finetune | quantized | merge | adapter
PROVENANCE = "corral.provenance"  # JSON: corral version, base, sources, operations, time
ORIGINAL_PRODUCER = "corral.producer.original"  # ONNX only: the producer before corral stamped it

# GGUF general.* keys (gguf-py `Keys.General`).
GENERAL_NAME = "general.name"
GENERAL_LICENSE = "general.license"
GENERAL_LICENSE_NAME = "general.license.name"
GENERAL_LICENSE_LINK = "general.license.link"
GENERAL_TAGS = "general.tags"
GENERAL_BASE_MODEL_PREFIX = "general.base_model."
GENERAL_ARCHITECTURE = "general.architecture"

# Generic license keys other tools write into safetensors / ONNX metadata.
FOREIGN_LICENSE = "license"
FOREIGN_LICENSE_NAME = "license_name"
# (label key, name key) pairs that say which license a file is under
LICENSE_LABEL_KEYS = ((GENERAL_LICENSE, GENERAL_LICENSE_NAME), (FOREIGN_LICENSE, FOREIGN_LICENSE_NAME))

# Model card: the `corral:` mapping in the YAML front matter.
CARD_SECTION = "corral"
CARD_POLICY = "policy"
CARD_MODEL_NAME = "model_name"
CARD_DECLARATION = "mau_declaration"
CARD_MULTIMODAL = "multimodal"


# The parts of the namespace a stamp owns (other corral modules keep their own keys, e.g.
# `corral.hf_config` in GGUF files and `corral.demo`; a re-stamp never touches those).
STAMP_PREFIXES = ("corral.license.", "corral.model.", "corral.base_model.")


def is_stamp_key(key: str) -> bool:
    """A key the stamp owns (replaced as a whole when an artifact is stamped again)."""
    return key.startswith(STAMP_PREFIXES) or key == PROVENANCE
