"""Synthetic checkpoints with the real Scout/Maverick tensor names and shapes.

`sparse=True` writes real headers and leaves the data as holes (apparent size ~200 GiB for
Scout, a few MB on disk): enough for header-only work such as `verify` and `inspect`.
`layers=N` keeps only the first N text layers (with the real embedding and lm_head) and
fills data with random bf16, for benchmarks that read or write every byte.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from real_configs import maverick_config, scout_config  # noqa: E402

from toolbox.checkpoint import from_config  # noqa: E402
from toolbox.tensors.safetensors_format import encode_header  # noqa: E402
from toolbox.tensors.sink import INDEX_NAME  # noqa: E402

CONFIGS = {"scout": scout_config, "maverick": maverick_config}


def make_checkpoint(out: Path, variant: str = "scout", *, shards: int = 50, sparse: bool = True,
                    layers: int | None = None, seed: int = 0) -> Path:
    """Write a synthetic HF checkpoint directory; returns `out`."""
    import torch

    from toolbox.demo import resolve_checkpoint

    cfg = CONFIGS[variant]()
    if layers is not None:
        cfg["text_config"]["num_hidden_layers"] = layers
        step = cfg["text_config"]["interleave_moe_layer_step"]
        cfg["text_config"]["moe_layers"] = list(range(step - 1, layers, step)) or [0]
        cfg["vision_config"]["num_hidden_layers"] = 1
    inventory = from_config(cfg).expected_tensors()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    demo = resolve_checkpoint("demo:scout")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (demo / name).exists():
            shutil.copy(demo / name, out / name)
    items = list(inventory.items())
    total = sum(math.prod(s) * 2 for _, s in items)
    per_shard = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in items:
        nbytes = math.prod(shape) * 2
        if groups[-1] and used + nbytes > per_shard and len(groups) < shards:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += nbytes
    n = len(groups)
    weight_map = {}
    g = torch.Generator().manual_seed(seed)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header = encode_header([(nm, "BF16", sh) for nm, sh in group], {"format": "pt"})
        size = len(header) + sum(math.prod(sh) * 2 for _, sh in group)
        with open(out / fname, "wb") as f:
            f.write(header)
            if sparse:
                f.truncate(size)
            else:
                for _nm, sh in group:
                    rows = sh[0] if len(sh) > 1 else 1
                    row_shape = sh[1:] if len(sh) > 1 else sh
                    step_rows = max(1, (64 << 20) // (math.prod(row_shape) * 2))
                    for r in range(0, rows, step_rows):
                        k = min(step_rows, rows - r)
                        t = (torch.randn((k, *row_shape), generator=g) * 0.02).to(torch.bfloat16)
                        f.write(t.view(torch.uint8).numpy().tobytes())
        weight_map.update({nm: fname for nm, _ in group})
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def make_scaled(out: Path, variant: str, *, experts: int, layers: int, vocab: int | None = None) -> Path:
    """A dense-data synthetic checkpoint of real per-expert shapes with `experts` routed experts (and, for
    benches that do not tokenize, a smaller vocabulary)."""
    real = CONFIGS[variant]

    def cfg() -> dict:
        c = real()
        c["text_config"]["num_local_experts"] = experts
        if vocab:
            c["text_config"].update(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return c

    key = f"{variant}-e{experts}-v{vocab}-l{layers}"
    CONFIGS[key] = cfg
    return make_checkpoint(out, key, shards=4, sparse=False, layers=layers)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--variant", default="scout", choices=sorted(CONFIGS))
    ap.add_argument("--shards", type=int, default=50)
    ap.add_argument("--dense-data", action="store_true", help="write random data instead of holes")
    ap.add_argument("--layers", type=int, default=None)
    a = ap.parse_args()
    p = make_checkpoint(a.out, a.variant, shards=a.shards, sparse=not a.dense_data, layers=a.layers)
    print(p, sum(f.stat().st_size for f in p.iterdir()) / 2**30, "GiB apparent")
