"""`corral inspect`: what a checkpoint is, from its headers."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from toolbox.cli._typer import typer
from toolbox.cli.options import CheckpointArg
from toolbox.cli.output import human_size, plain, plural

EPILOG = """\
Examples:

  corral inspect demo:scout

  corral inspect ./Llama-4-Scout-17B-16E-Instruct

  corral inspect scout-q8_0.gguf

  corral --json inspect ./Llama-4-Maverick-17B-128E-Instruct | jq .parameters
"""


def _human_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)




def _row(table: Table, label: str, value: object, style: str = "") -> None:
    """A row whose value is data (paths, names, metadata from the file): printed verbatim, never as markup."""
    table.add_row(label, plain(value, style))


def _render_gguf(info: dict[str, Any], console: Console) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    _row(t, "path", info["path"] + (f" (+{len(info['files']) - 1} split parts)" if len(info["files"]) > 1 else ""))
    _row(t, "format", f"GGUF, architecture {info['architecture']}, name {info['name']}")
    if "layers" in info:
        layers, e = info["layers"], info["experts"]
        _row(t, "shaped like", f"{info['shaped_like']}; {_human_count(info['parameters']['text'])} text parameters, "
                  f"{_human_count(info['parameters']['active_text'])} active")
        _row(t, "layers", f"{layers['count']}: MoE {layers['moe']}, dense {layers['dense']}, NoPE {layers['nope']}")
        _row(t, "experts", f"{e['count']} routed (top-{e['top_k']}, width {e['width']})")
    _row(t, "tensor types", ", ".join(f"{k}×{v}" for k, v in sorted(info["types"].items())))
    _row(t, "size", human_size(info["bytes"]))
    tok = info["tokenizer"]
    _row(t, "tokenizer", f"{tok['model']}/{tok['pre']}, {tok['vocab_size']} tokens, bos {tok['bos_id']}, "
              f"eos {tok['eos_id']}, chat template {'yes' if tok['chat_template'] else 'no'}")
    lic = info["license"]
    _row(t, "license", ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in lic.items() if v) or "none",
         "" if any(lic.values()) else "red")
    console.print(t)


def _render(info: dict[str, Any], console: Console) -> None:
    if info.get("format") == "gguf":
        _render_gguf(info, console)
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    p = info["parameters"]
    layers = info["layers"]
    e = info["experts"]
    a = info["attention"]
    _row(t, "path", info["path"])
    _row(t, "architecture", f"{info['architecture']} (variant: {info['variant']}, shaped like "
              f"{info['shaped_like']})")
    _row(t, "parameters", f"{_human_count(p['total'])} total, {_human_count(p['active_text'])} active per token "
              f"(text {_human_count(p['text'])}, vision {_human_count(p['vision'])})")
    _row(t, "layers", f"{layers['count']}: MoE {layers['moe']}, dense {layers['dense']}, NoPE {layers['nope']}")
    _row(t, "experts", f"{e['count']} routed (top-{e['top_k']}, width {e['width']}) + shared; "
              f"dense width {e['dense_width']}")
    _row(t, "attention", f"{a['heads']} heads, {a['kv_heads']} kv, head_dim {a['head_dim']}, "
              f"qk-norm {'on' if a['qk_norm'] else 'off'}, chunk {a['chunk_size']}, rope {a['rope']}")
    _row(t, "dtypes", ", ".join(f"{k}×{v}" for k, v in sorted(info["dtypes"].items())) +
              f"; layout {info['layout']}{', FP8' if info['fp8'] else ''}")
    _row(t, "shards", f"{plural(info['shards']['count'], 'file')}, {human_size(info['shards']['bytes'])}")
    tok = info["tokenizer"]
    if "error" in tok:
        _row(t, "tokenizer", tok["error"], "red")
    else:
        _row(t, "tokenizer", f"{tok['vocab_size']} tokens, bos {tok['bos']}, eos {tok['eos']}, pad {tok['pad']}, "
                  f"chat template {'yes' if tok['chat_template'] else 'no'}")
    lic = info["license_files"]
    _row(t, "license files", ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in lic.items()))
    console.print(t)


def inspect(ctx: typer.Context, path: CheckpointArg) -> None:
    """Summarise a Llama 4 checkpoint (HF directory, GGUF file or ONNX export): variant, parameters, layers,
    experts, dtypes, shards, tokenizer and license metadata. Reads headers only."""
    from toolbox.inspect import inspect_checkpoint

    out = ctx.obj
    info = inspect_checkpoint(path, progress=out.progress())
    out.result(info, lambda console: _render(info, console))
