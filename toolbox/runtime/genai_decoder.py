"""Generate with onnxruntime-genai's own loop (its KV cache management) on a corral ONNX export.

Used by `verify --run`, the tests and the benchmark; the export directory holds genai_config.json
(converters.onnx_genai). Token ids in and out, so callers compare against onnxruntime or
transformers on the same prompt ids (genai's tokenizer does not add the BOS token that
tokenizer_config.json's add_bos_token asks transformers to add).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"


def has_genai_config(path: str | Path) -> bool:
    p = Path(path)
    return ((p if p.is_dir() else p.parent) / GENAI_CONFIG).is_file()


class GenaiDecoder:
    """An onnxruntime_genai.Model of an export directory."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime_genai as og

        p = Path(path)
        self.og = og
        self.model = og.Model(str(p if p.is_dir() else p.parent))

    def generate(self, ids: list[int], steps: int, *, do_sample: bool = False, seed: int | None = None,
                 **search: Any) -> list[int]:
        """`steps` new tokens after prompt `ids` (greedy unless do_sample; genai stops early at an EOS id)."""
        tokens, _ = self.generate_timed(ids, steps, do_sample=do_sample, seed=seed, **search)
        return tokens

    def generate_timed(self, ids: list[int], steps: int, *, do_sample: bool = False, seed: int | None = None,
                       **search: Any) -> tuple[list[int], list[float]]:
        """The new tokens and each step's seconds (the first includes the prompt)."""
        params = self.og.GeneratorParams(self.model)
        opts: dict[str, Any] = {"max_length": len(ids) + steps, "do_sample": do_sample, **search}
        if seed is not None:
            opts["random_seed"] = seed
        params.set_search_options(**opts)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens([int(i) for i in ids])
        out: list[int] = []
        times: list[float] = []
        for _ in range(steps):  # bounded: max_length stops genai too
            if gen.is_done():
                break
            t = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t)
            out.append(int(gen.get_next_tokens()[0]))
        return out, times
