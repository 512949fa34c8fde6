"""Drive a corral ONNX export in onnxruntime: prefill, then one token at a time with the KV cache.

Shared by `verify --run`, the benchmark and the tests, so the I/O convention lives in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxDecoder:
    """A session plus the cache layout read from its inputs (past_key_values.N.key/value)."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        p = Path(path)
        model = p / "model.onnx" if p.is_dir() else p
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    @property
    def kv_cache(self) -> bool:
        return bool(self.past_names)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        out = {}
        for n in self.past_names:
            i = self.inputs[n]
            heads, head_dim = i.shape[1], i.shape[3]
            out[n] = np.zeros((batch, heads, 0, head_dim), dtype=_NP.get(i.type, np.float32))
        return out

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits [B, S, V] and the new cache (as past_key_values.* feeds)."""
        feeds: dict[str, Any] = {"input_ids": input_ids.astype(np.int64),
                                 "attention_mask": attention_mask.astype(np.int64),
                                 "position_ids": position_ids.astype(np.int64)}
        if self.kv_cache:
            feeds.update(cache if cache is not None else self.empty_cache(input_ids.shape[0]))
        outs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, outs, strict=True))
        new_cache = {n.replace("present.", "past_key_values.", 1): res[n] for n in self.present_names}
        return res["logits"], new_cache

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int
               ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy decoding (left-padded batch): generated tokens [B, steps] and each step's last logits."""
        ids, mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, cache = self.run(ids, mask, pos)
        out, all_logits = [], []
        for _ in range(steps):
            last = logits[:, -1]
            all_logits.append(last)
            nxt = last.argmax(-1)[:, None].astype(np.int64)
            out.append(nxt)
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            pos = pos[:, -1:] + 1
            if self.kv_cache:
                logits, cache = self.run(nxt, mask, pos, cache)
            else:
                ids = np.concatenate([ids, nxt], axis=1)
                logits, _ = self.run(ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None))
        return np.concatenate(out, axis=1), all_logits
