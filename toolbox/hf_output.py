"""The tail every HF checkpoint corral writes shares (merge, prune, extract): config.json, the
tokenizer and processor files copied from the input, and the license sidecars, all inside the
staging directory before its atomic rename."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from license.stamp import Stamp

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json", "tokenizer.model", "preprocessor_config.json",
                "processor_config.json")


def finish_hf_directory(staging: Path, src_dir: Path, config: dict[str, Any], stamp: Stamp) -> None:
    """Write `config` as config.json, copy the input's tokenizer/processor files and write the sidecars."""
    from license.stamp import write_sidecars

    write_model_files(staging, src_dir, config)
    write_sidecars(staging, stamp)


def write_model_files(staging: Path, src_dir: Path, config: dict[str, Any]) -> None:
    """`config` as config.json and the input's tokenizer/processor files: an HF checkpoint without its weights,
    what a converter reads beside the tensors of a model streamed to it (`toolbox.reference.DerivedModel`)."""
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for filename in COPIED_FILES:
        if (src_dir / filename).is_file():
            shutil.copyfile(src_dir / filename, staging / filename)
