"""Issue 4 (vision): image embeddings of corral's mmproj and of llama.cpp's own `--mmproj` converter, both
run in llama.cpp's multimodal runtime (libmtmd) and compared with transformers on the same pixels.

The checkpoint is demo:scout's structure with 3 vision layers: llama.cpp's converter cannot map
`vision_adapter.mlp.fc2` when the tower has fewer than 3 layers (it sizes its name map by the layer
count), so it fails on demo:scout itself; that failure is recorded too. Images are 56 x 56 (one tile,
no resize). Run:
  python bench/bench_mmproj.py [--work bench/work] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))  # the libmtmd harness lives with the tests

from bench_gguf import llama_cpp_converter  # noqa: E402
from results import write_section  # noqa: E402

DECL = "below-700m"
MARKER = "## HF -> mmproj GGUF, image embeddings (issue 4)"


def demo_with_vision_layers(out: Path, layers: int) -> Path:
    """demo:scout's structure with `layers` vision layers (weights generated the same way)."""
    import toolbox.demo as demo

    if (out / "config.json").is_file():
        return out
    original = demo.demo_config

    def patched(variant: str) -> dict:
        cfg = original(variant)
        cfg["vision_config"]["num_hidden_layers"] = layers
        return cfg

    demo.demo_config = patched
    try:
        demo.create_demo(out, "scout")
    finally:
        demo.demo_config = original
    return out


def llama_cpp_mmproj(script: Path, ckpt: Path, out: Path, outtype: str) -> tuple[float, str | None]:
    (ckpt / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    t = time.perf_counter()
    res = subprocess.run([sys.executable, str(script), str(ckpt), "--mmproj", "--outtype", outtype, "--outfile",
                          str(out)], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")})
    wall = time.perf_counter() - t
    (ckpt / "preprocessor_config.json").unlink()
    return wall, None if res.returncode == 0 else res.stderr.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import numpy as np
    import torch
    from llama_cpp_mtmd import MtmdRuntime, relative_error
    from transformers import Llama4ForConditionalGeneration

    from converters.gguf_mmproj import convert_hf_to_mmproj
    from converters.hf_to_gguf import convert_hf_to_gguf
    from toolbox.demo import resolve_checkpoint

    work = args.work / "mmproj"
    work.mkdir(parents=True, exist_ok=True)
    script = llama_cpp_converter(args.work)
    assert script is not None
    _, failure_2 = llama_cpp_mmproj(script, resolve_checkpoint("demo:scout"), work / "lcpp-2layers.gguf", "f32")
    ckpt = demo_with_vision_layers(work / "demo-3-vision-layers", 3)
    text = work / "text-bf16.gguf"
    if not text.exists():
        convert_hf_to_gguf(ckpt, text, outtype="bf16", mau_declaration=DECL)
    rt = MtmdRuntime(text)
    model = Llama4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    images = [np.random.default_rng(s).integers(0, 256, size=(56, 56, 3), dtype=np.uint8) for s in range(4)]

    def reference(img: np.ndarray) -> np.ndarray:
        px = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            return model.multi_modal_projector(model.vision_model(px).last_hidden_state)[0].numpy()

    refs = [reference(img) for img in images]
    rows = []
    for outtype in ("f32", "f16"):
        ours = work / f"corral-{outtype}.mmproj.gguf"
        t = time.perf_counter()
        convert_hf_to_mmproj(ckpt, ours, outtype=outtype, mau_declaration=DECL, force=True)
        ours_wall = time.perf_counter() - t
        theirs = work / f"llama.cpp-{outtype}.mmproj.gguf"
        theirs_wall, failed = llama_cpp_mmproj(script, ckpt, theirs, outtype)
        for label, path, wall in (("corral", ours, ours_wall), ("llama.cpp convert_hf_to_gguf.py --mmproj",
                                                                 theirs, theirs_wall)):
            if label != "corral" and failed:
                rows.append((label, outtype, "failed", failed, f"{wall:.2f} s"))
                continue
            errs = [relative_error(rt.image_embeddings(path, img), ref) for img, ref in zip(images, refs, strict=True)]
            orders = sorted({o for _, o in errs})
            rows.append((label, outtype, f"{max(e for e, _ in errs):.2e}", ", ".join(orders), f"{wall:.2f} s"))
    lines = [f"{MARKER} — {date.today()}, {platform.machine()}, {os.cpu_count()} cores",
             "",
             "demo:scout structure with 3 vision layers; 4 random 56x56 RGB images (one tile, no resize); error =",
             "max |llama.cpp - transformers| / max |transformers| over the 4 projected image embeddings, in the token",
             "order that matches (llama.cpp 0.3.36 emits transformers' merged token grid column by column).",
             "",
             "| converter | type | max rel. error | token order | convert wall |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", f"llama.cpp's converter on demo:scout itself (2 vision layers): {failure_2 or 'ok'}", ""]
    text_out = "\n".join(lines)
    print(text_out)
    if args.write:
        write_section(MARKER, text_out)


if __name__ == "__main__":
    main()
