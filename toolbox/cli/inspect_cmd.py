"""`corral inspect`: what a checkpoint is, from its headers."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from toolbox.cli._typer import typer
from toolbox.cli.options import CheckpointArg

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


def _human_bytes(n: int) -> str:
    for unit, div in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _render_gguf(info: dict[str, Any], console: Console) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("path", info["path"] + (f" (+{len(info['files']) - 1} split parts)" if len(info["files"]) > 1 else ""))
    t.add_row("format", f"GGUF, architecture {info['architecture']}, name {info['name']}")
    if "layers" in info:
        layers, e = info["layers"], info["experts"]
        t.add_row("shaped like", f"{info['shaped_like']}; {_human_count(info['parameters']['text'])} text parameters, "
                  f"{_human_count(info['parameters']['active_text'])} active")
        t.add_row("layers", f"{layers['count']}: MoE {layers['moe']}, dense {layers['dense']}, NoPE {layers['nope']}")
        t.add_row("experts", f"{e['count']} routed (top-{e['top_k']}, width {e['width']})")
    t.add_row("tensor types", ", ".join(f"{k}×{v}" for k, v in sorted(info["types"].items())))
    t.add_row("size", _human_bytes(info["bytes"]))
    tok = info["tokenizer"]
    t.add_row("tokenizer", f"{tok['model']}/{tok['pre']}, {tok['vocab_size']} tokens, bos {tok['bos_id']}, "
              f"eos {tok['eos_id']}, chat template {'yes' if tok['chat_template'] else 'no'}")
    lic = info["license"]
    t.add_row("license", ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in lic.items() if v) or "[red]none[/red]")
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
    t.add_row("path", info["path"])
    t.add_row("architecture", f"{info['architecture']} (variant: {info['variant']}, shaped like "
              f"{info['shaped_like']})")
    t.add_row("parameters", f"{_human_count(p['total'])} total, {_human_count(p['active_text'])} active per token "
              f"(text {_human_count(p['text'])}, vision {_human_count(p['vision'])})")
    t.add_row("layers", f"{layers['count']}: MoE {layers['moe']}, dense {layers['dense']}, NoPE {layers['nope']}")
    t.add_row("experts", f"{e['count']} routed (top-{e['top_k']}, width {e['width']}) + shared; "
              f"dense width {e['dense_width']}")
    t.add_row("attention", f"{a['heads']} heads, {a['kv_heads']} kv, head_dim {a['head_dim']}, "
              f"qk-norm {'on' if a['qk_norm'] else 'off'}, chunk {a['chunk_size']}, rope {a['rope']}")
    t.add_row("dtypes", ", ".join(f"{k}×{v}" for k, v in sorted(info["dtypes"].items())) +
              f"; layout {info['layout']}{', FP8' if info['fp8'] else ''}")
    t.add_row("shards", f"{info['shards']['count']} files, {_human_bytes(info['shards']['bytes'])}")
    tok = info["tokenizer"]
    if "error" in tok:
        t.add_row("tokenizer", f"[red]{tok['error']}[/red]")
    else:
        t.add_row("tokenizer", f"{tok['vocab_size']} tokens, bos {tok['bos']}, eos {tok['eos']}, pad {tok['pad']}, "
                  f"chat template {'yes' if tok['chat_template'] else 'no'}")
    lic = info["license_files"]
    t.add_row("license files", ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in lic.items()))
    console.print(t)


def inspect(ctx: typer.Context, path: CheckpointArg) -> None:
    """Summarise a Llama 4 checkpoint (HF directory or GGUF file): variant, parameters, layers,
    experts, dtypes, shards, tokenizer and license metadata. Reads headers only."""
    from toolbox.inspect import inspect_checkpoint

    out = ctx.obj
    info = inspect_checkpoint(path, progress=out.progress())
    out.result(info, lambda console: _render(info, console))
