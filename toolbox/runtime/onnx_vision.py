"""Run an image + text prompt through corral's ONNX export (`convert --to onnx --vision`) in onnxruntime.

vision.onnx turns pixel_values tiles into image_features; embedding.onnx embeds the prompt's tokens and
puts image_features row n at the n-th `<|patch|>` token; decoder_embeds.onnx is the text decoder on
those embeddings (KV cache as model.onnx). Text-only steps after the prompt pass no image features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolbox.errors import BadInputError


class OnnxVisionModel:
    """The three sessions of an export directory plus its image processor settings."""

    def __init__(self, directory: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        d = Path(directory)
        missing = [f for f in ("vision.onnx", "embedding.onnx", "decoder_embeds.onnx", "preprocessor_config.json")
                   if not (d / f).is_file()]
        if missing:
            raise BadInputError(f"{d}: no {', '.join(missing)}", hint="export with corral convert --to onnx --vision",
                                path=d)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads

        def session(name: str) -> Any:
            return ort.InferenceSession(str(d / name), opts, providers=["CPUExecutionProvider"])

        self.vision, self.embedding, self.decoder = (session("vision.onnx"), session("embedding.onnx"),
                                                     session("decoder_embeds.onnx"))
        self.settings = json.loads((d / "preprocessor_config.json").read_text())
        self.layout = self.settings["corral_vision"]
        self.inputs = {i.name: i for i in self.decoder.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.hidden = int(self.embedding.get_inputs()[1].shape[1])
        self.feature_type = np.float16 if self.embedding.get_inputs()[1].type == "tensor(float16)" else np.float32

    def pixel_values(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """An image file or PIL image -> (pixel_values tiles, (tiles down, tiles across))."""
        from toolbox.runtime.llama4_image import load_image, preprocess

        img = load_image(image) if isinstance(image, (str, Path)) else image
        return preprocess(img, self.settings)

    def image_prompt(self, aspect: tuple[int, int]) -> str:
        """The image's special tokens for the prompt (put where the image goes, e.g. after the user header)."""
        from toolbox.runtime.llama4_image import image_prompt

        return image_prompt(aspect, int(self.layout["tokens_per_tile"]))

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """[tiles, tokens_per_tile, hidden]: transformers' get_image_features + multi_modal_projector."""
        return self.vision.run(None, {"pixel_values": np.asarray(pixel_values, dtype=np.float32)})[0]

    def embed(self, input_ids: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        flat = (np.zeros((0, self.hidden), dtype=self.feature_type) if features is None
                else features.reshape(-1, self.hidden).astype(self.feature_type))
        n_image = int((ids == int(self.layout["image_token_id"])).sum())
        if n_image != flat.shape[0]:
            raise BadInputError(f"the prompt has {n_image} image tokens, the image {flat.shape[0]} feature rows",
                                hint="put image_prompt(aspect) in the prompt once per image")
        return self.embedding.run(None, {"input_ids": ids, "image_features": flat})[0]

    def run(self, input_ids: np.ndarray, features: np.ndarray | None, attention_mask: np.ndarray,
            position_ids: np.ndarray, cache: dict[str, np.ndarray] | None = None
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward of the decoder on the embedded prompt: logits [B, S, V] and the new cache."""
        feeds: dict[str, Any] = {"inputs_embeds": self.embed(input_ids, features),
                                 "attention_mask": attention_mask.astype(np.int64),
                                 "position_ids": position_ids.astype(np.int64)}
        if self.past_names:
            if cache is None:
                b = input_ids.shape[0]
                cache = {n: np.zeros((b, self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), dtype=self.feature_type)
                         for n in self.past_names}
            feeds.update(cache)
        outs = dict(zip([o.name for o in self.decoder.get_outputs()], self.decoder.run(None, feeds), strict=True))
        new = {k.replace("present.", "past_key_values.", 1): v for k, v in outs.items() if k.startswith("present.")}
        return outs["logits"], new

    def generate(self, input_ids: np.ndarray, pixel_values: np.ndarray | None, steps: int
                 ) -> tuple[list[int], np.ndarray]:
        """Greedy decoding of one prompt: the new tokens and the prompt's logits [1, S, V]."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        features = self.image_features(pixel_values) if pixel_values is not None else None
        mask = np.ones_like(ids)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, cache = self.run(ids, features, mask, pos)
        prompt_logits, out = logits, []
        for _ in range(steps):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            if not self.past_names:
                ids = np.concatenate([ids, [[nxt]]], axis=1)
                logits, _ = self.run(ids, features, mask, np.arange(ids.shape[1])[None])
                continue
            logits, cache = self.run(np.array([[nxt]], dtype=np.int64), None, mask, pos, cache)
        return out, prompt_logits
