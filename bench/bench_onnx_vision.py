"""Issue 19 (vision.onnx): export time, bytes and max RSS of the Scout-shaped vision encoder, and ms per tile
in onnxruntime against transformers' Llama4VisionModel + projector on the same weights and pixels.

Source: bench/work/scout-1layer (Scout's vision widths: hidden 1408, 336 x 336 tiles, projector to 5120;
one vision layer of Scout's 34, like its one text layer), read-only. The export goes to a temporary
directory that is deleted afterwards. Run:
  python bench/bench_onnx_vision.py [--source bench/work/scout-1layer] [--tiles 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

MARKER = "## HF -> vision.onnx, Scout-shaped vision encoder (issue 19)"


def _reference(source: Path) -> Any:
    """transformers' vision model + projector with the checkpoint's vision weights (fp32), nothing else loaded."""
    from safetensors import safe_open
    from torch import nn
    from transformers import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    cfg = Llama4Config(**{k: v for k, v in json.loads((source / "config.json").read_text()).items()
                          if k != "architectures"})
    ref = nn.Module()
    ref.vision_model = Llama4VisionModel(cfg.vision_config)
    ref.multi_modal_projector = Llama4MultiModalProjector(cfg)
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    state = {}
    for name, file in index.items():
        if name.startswith(("vision_model.", "multi_modal_projector.")):
            with safe_open(str(source / file), "pt") as f:
                state[name] = f.get_tensor(name).float()
    ref.load_state_dict(state, strict=False)
    return ref.float().eval()


def _time(fn: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", type=Path, default=HERE / "work" / "scout-1layer")
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort
    import torch

    from converters.onnx_vision import export_vision
    from license.stamp import LicenseOptions
    from toolbox.reference import resolve

    with tempfile.TemporaryDirectory(dir=HERE / "work") as tmp:
        t = time.perf_counter()
        opts = LicenseOptions(mau_declaration="below-700m")
        res = export_vision(resolve(args.source), Path(tmp), license_options=opts)
        export_s = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        disk = sum(f.stat().st_size for f in Path(tmp).iterdir())
        size = res.image_size
        pixels = np.random.default_rng(0).standard_normal((args.tiles, 3, size, size)).astype(np.float32)
        sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"pixel_values": pixels})[0]
        ort_s = _time(lambda: sess.run(None, {"pixel_values": pixels}))
        ref = _reference(args.source)
        with torch.no_grad():
            want = ref.multi_modal_projector(ref.vision_model(torch.tensor(pixels)).last_hidden_state).numpy()
            hf_s = _time(lambda: ref.multi_modal_projector(ref.vision_model(torch.tensor(pixels)).last_hidden_state))
    err = float(np.abs(got - want).max())
    rows = [("export (trace on meta + stream weights), fp32", f"{export_s:.1f} s, max RSS {rss:.2f} GiB"),
            ("vision.onnx + data + preprocessor_config.json", f"{disk / 2**20:.1f} MiB ({res.tensors} tensors)"),
            (f"ms per tile, {args.tiles} tiles: onnxruntime vs transformers (best of 3)",
             f"{1000 * ort_s / args.tiles:.0f} vs {1000 * hf_s / args.tiles:.0f} ms = {ort_s / hf_s:.2f}x"),
            ("max abs difference of the features from transformers", f"{err:.2e}")]
    text = "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(text)
    if args.write:
        from results import write_section

        body = (f"{MARKER}\nCommand: `python bench/bench_onnx_vision.py --write`. Source: `scout-1layer` "
                "(Scout's vision widths, 1 vision layer of 34), 336 x 336 tiles, fp32; "
                "a 2-core VM shared with other engineers' jobs.\n\n"
                "| what | figure |\n|---|---|\n" + text + "\n")
        write_section(MARKER, body)


if __name__ == "__main__":
    main()
