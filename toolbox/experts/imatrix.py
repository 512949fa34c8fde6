"""Importance matrices computed from the HF checkpoint, layer-streamed, in llama.cpp's GGUF imatrix format.

What llama-imatrix collects (tools/imatrix/imatrix.cpp `collect_imatrix`), per weight matrix named as in
corral's GGUF: the sum over tokens of the squared activation entering each input column, and the tokens
counted. For a routed-expert tensor (`ffn_{gate,up,down}_exps`) one row and one count per expert, from the
tokens routed to it; Llama 4 scales an expert's input by its router score sigmoid(logit) before the expert
(llama.cpp's llama4 graph: weight before FFN), so gate/up see score * x and down sees the activation of
that. The text is cut as llama-imatrix cuts it: the whole file tokenized with BOS (special-token text in
a .txt file read as plain text; chat records rendered with the template), chunks of `chunk` tokens each
starting with BOS (the first token replaced), the tail dropped, each chunk its own sequence.
output.weight is left out, as llama-imatrix leaves it out without --process-output.

`all_experts`: every routed expert also gets statistics on every token, as if routed there: its input is
score_e * x with its own router score score_e = sigmoid(logit_e), so a token weighs in with the square
of how strongly the router leans to that expert (a routed token contributes exactly what it contributes
without the option), and every expert's count is the number of tokens. The model's output still comes
from the routed experts only. It costs the experts' work times n_experts / top_k.

Memory: one decoder layer plus the activations of at most GROUP_TOKENS tokens (each group of chunks is
one layer-streamed pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from license.stamp import LicenseOptions
from toolbox.errors import BadInputError, UsageError
from toolbox.experts.forward import StreamedModel
from toolbox.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    import torch

    from toolbox.tensors.gguf.imatrix_write import ImatrixSums

DEFAULT_CHUNK = 512  # llama-imatrix's default context
MIN_CHUNK = 16  # llama-imatrix skips matrix products of fewer rows
MAX_CHUNK = 8192
MAX_CALIBRATION_BYTES = 32 * 1024**2
MAX_IN_FILES = 64
GROUP_TOKENS = 16384  # tokens per layer-streamed pass


@dataclass
class ImatrixResult:
    path: Path
    entries: int
    chunks: int
    chunk_size: int
    tokens: int
    all_experts: bool
    routed: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens routed to each expert
    seen: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens each expert has statistics of
    in_files: list[str] = field(default_factory=list)

    def uncalibrated(self) -> int:
        """Experts (summed over layers) with no statistics in the written file."""
        return sum(1 for v in self.seen.values() for c in v if c == 0)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "entries": self.entries, "chunks": self.chunks, "chunk_size": self.chunk_size,
                "tokens": self.tokens, "all_experts": self.all_experts, "uncalibrated_experts": self.uncalibrated(),
                "experts": {str(k): {"routed": v, "seen": self.seen.get(k, v)} for k, v in self.routed.items()},
                "in_files": self.in_files}


def imatrix_chunks(calibration: str | Path, checkpoint_dir: Path, chunk: int,
                   max_chunks: int | None = None) -> list[list[int]]:
    """Token chunks as llama-imatrix makes them (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    from toolbox.experts.calibration import read_texts

    p = Path(calibration)
    if p.is_file() and p.stat().st_size > MAX_CALIBRATION_BYTES:
        raise BadInputError(f"{p}: {p.stat().st_size} bytes of calibration text (at most {MAX_CALIBRATION_BYTES})",
                            hint="pass a smaller file, or split it and combine the results with --in-file", path=p)
    texts, chats = read_texts(p)
    tok = PreTrainedTokenizerFast.from_pretrained(str(checkpoint_dir))
    split = chats is None  # plain text: "<|header_start|>" is text, as llama-imatrix reads it (no --parse-special)
    if chats is not None:
        if not tok.chat_template:
            raise BadInputError(f"{checkpoint_dir}: no chat template to render chat records with", path=checkpoint_dir)
        texts = [str(tok.apply_chat_template(m, tokenize=False)) for m in chats]
    assert texts is not None
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, split_special_tokens=split)["input_ids"])
    bos = tok.bos_token_id
    n = len(ids) // chunk if max_chunks is None else min(max_chunks, len(ids) // chunk)
    if n < 1:
        raise BadInputError(f"{p}: {len(ids)} tokens, fewer than one chunk of {chunk}",
                            hint="use more text or a smaller --chunk", path=p)
    out = [ids[i * chunk:(i + 1) * chunk] for i in range(n)]
    if bos is not None:
        for c in out:
            c[0] = bos
    return out


class _Collector:
    """Sums of squared inputs per GGUF weight name, accumulated in float64."""

    def __init__(self, all_experts: bool) -> None:
        self.all_experts = all_experts
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.routed: dict[int, torch.Tensor] = {}

    def add(self, name: str, x: torch.Tensor, row: int = 0, n_mat: int = 1) -> None:
        import torch

        x = x.reshape(-1, x.shape[-1])
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64)
            self.counts[name] = torch.zeros(n_mat, dtype=torch.int64)
        self.sums[name][row] += x.double().square().sum(0)
        self.counts[name][row] += x.shape[0]

    def attach(self, i: int, layer: Any) -> None:
        """Hooks on every linear of decoder layer `i` and a collecting MoE forward."""
        import torch

        from converters.gguf_names import BLOCK_TENSORS, gguf_name

        for suffix, kind in BLOCK_TENSORS.items():
            path = suffix.removesuffix(".weight")
            try:
                sub = layer.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(sub, torch.nn.Linear):
                name = gguf_name(kind, i)
                sub.register_forward_pre_hook(lambda _m, args, name=name: self.add(name, args[0]))
        if layer.is_moe_layer:
            layer.feed_forward.forward = self._moe_forward(i, layer.feed_forward)

    def _moe_forward(self, i: int, moe: Any) -> Any:
        """Llama4TextMoe's forward over the routed experts (as toolbox.experts.forward runs it), recording
        each expert's inputs; with all_experts every expert's also on the tokens not routed to it."""
        import torch

        from converters.gguf_names import gguf_name

        names = [gguf_name(k, i) for k in ("FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP")]
        n_exp = moe.num_experts

        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = hidden_states.reshape(-1, moe.hidden_dim)
            _scores, logits = moe.router(x)
            out = moe.shared_expert(x)
            experts = moe.experts
            top = torch.topk(logits, moe.top_k, dim=1).indices
            score = torch.sigmoid(logits.float()).to(x.dtype)
            routed = self.routed.setdefault(i, torch.zeros(n_exp, dtype=torch.int64))
            for e in range(n_exp):
                rows = (top == e).any(dim=1).nonzero(as_tuple=True)[0]
                routed[e] += rows.numel()
                use = torch.arange(x.shape[0]) if self.all_experts else rows
                if use.numel() == 0:
                    self._touch(names, e, n_exp, x.shape[-1], experts.down_proj.shape[1])
                    continue
                xe = x[use] * score[use, e].unsqueeze(1)
                gate, up = (xe @ experts.gate_up_proj[e]).chunk(2, dim=-1)
                act = up * experts.act_fn(gate)
                for n in names[:2]:
                    self.add(n, xe, e, n_exp)
                self.add(names[2], act, e, n_exp)
                if rows.numel():  # with all_experts `use` is every token, so act's row r is token r
                    part = act[rows] if self.all_experts else act
                    out.index_add_(0, rows, part @ experts.down_proj[e])
            return out, logits
        return forward

    def _touch(self, names: Sequence[str], e: int, n_exp: int, hidden: int, ffn: int) -> None:
        """Create an expert tensor's entry when its expert saw no token (llama.cpp writes zero rows)."""
        import torch

        for n, width in zip(names, (hidden, hidden, ffn), strict=True):
            if n not in self.sums:
                self.sums[n] = torch.zeros(n_exp, width, dtype=torch.float64)
                self.counts[n] = torch.zeros(n_exp, dtype=torch.int64)

    def to_sums(self, chunk: int, dataset: str, chunks: int) -> ImatrixSums:
        from toolbox.tensors.gguf.imatrix_write import ImatrixSums

        out = ImatrixSums(chunk, datasets=[dataset], chunk_count=chunks)
        for n, s in self.sums.items():
            out.sums[n] = s.numpy()
            out.counts[n] = self.counts[n].numpy()
        return out


class _CollectingModel(StreamedModel):
    collector: _Collector

    def layer(self, i: int) -> Any:
        module = super().layer(i)
        self.collector.attach(i, module)
        return module


def compute_imatrix(src: str | Path, out: str | Path, calibration: str | Path | None = None, *,
                    chunk: int = DEFAULT_CHUNK, max_chunks: int | None = None, all_experts: bool = False,
                    in_files: Sequence[str | Path] = (), dtype: str = "float32", force: bool = False,
                    license_options: LicenseOptions | None = None,
                    progress: Progress = NULL_PROGRESS) -> ImatrixResult:
    """Compute `src`'s importance matrix on `calibration` (and/or add `in_files`, llama-imatrix --in-file)
    and write it to `out` in llama.cpp's GGUF imatrix format, with the Llama 4 license stamp."""
    from toolbox.experts.output import require_hf
    from toolbox.reference import resolve
    from toolbox.tensors.atomic import atomic_file, check_output_path

    require_hf(src)
    out = Path(out).absolute()
    if out.suffix != ".gguf":
        raise UsageError(f"output {out} must end in .gguf (llama.cpp's GGUF imatrix format)")
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise UsageError(f"--chunk {chunk}: choose {MIN_CHUNK}..{MAX_CHUNK} tokens")
    if max_chunks is not None and max_chunks < 1:
        raise UsageError("--chunks must be at least 1")
    if calibration is None and not in_files:
        raise UsageError("nothing to compute", hint="pass --calibration FILE, or --in-file FILE to combine")
    if len(in_files) > MAX_IN_FILES:
        raise UsageError(f"at most {MAX_IN_FILES} --in-file")
    check_output_path(out, force=force)
    model = resolve(src)
    data, routed, tokens, chunks = _collect(model, calibration, chunk, max_chunks, all_experts, dtype, progress)
    data, used = _merge_in_files(data, in_files)
    stamp = _stamp(model, calibration, chunk, chunks, all_experts, used, license_options)
    from license.stamp import apply_to_gguf_writer
    from toolbox.tensors.gguf.imatrix_write import write_imatrix_gguf

    with atomic_file(out, force=force) as tmp:
        entries = write_imatrix_gguf(tmp, data, decorate=lambda w: apply_to_gguf_writer(w, stamp))
    seen = {}
    for i in routed:
        name = f"blk.{i}.ffn_up_exps.weight"
        seen[i] = [int(c) for c in data.counts[name]] if name in data.counts else routed[i]
    return ImatrixResult(out, entries, data.chunk_count, chunk, tokens, all_experts, routed, seen, used)


def _collect(model: Any, calibration: str | Path | None, chunk: int, max_chunks: int | None, all_experts: bool,
             dtype: str, progress: Progress) -> tuple[ImatrixSums, dict[int, list[int]], int, int]:
    from toolbox.experts.forward import open_streamed
    from toolbox.tensors.gguf.imatrix_write import ImatrixSums

    if calibration is None:
        return ImatrixSums(chunk), {}, 0, 0
    base = open_streamed(model.path, dtype=dtype)
    streamed = _CollectingModel(base.path, base.source, base.ckpt, base.config, base.dtype)
    streamed.collector = collector = _Collector(all_experts)
    with streamed:
        seqs = imatrix_chunks(calibration, streamed.path, chunk, max_chunks)
        per = max(1, GROUP_TOKENS // chunk)
        for g in range(0, len(seqs), per):
            streamed.final_hidden(seqs[g:g + per], progress=progress, label=f"imatrix chunks {g + 1}-"
                                  f"{min(len(seqs), g + per)} of {len(seqs)}")
    data = collector.to_sums(chunk, str(calibration), len(seqs))
    routed = {i: [int(c) for c in v] for i, v in sorted(collector.routed.items())}
    return data, routed, len(seqs) * chunk, len(seqs)


def _merge_in_files(data: ImatrixSums, in_files: Sequence[str | Path]) -> tuple[ImatrixSums, list[str]]:
    """The --in-file files' raw sums plus this run's (datasets in llama-imatrix's order: files first)."""
    from toolbox.tensors.gguf.imatrix import load_imatrix
    from toolbox.tensors.gguf.imatrix_write import ImatrixSums, raw_sums

    if not in_files:
        return data, []
    total = ImatrixSums(data.chunk_size)
    for f in in_files:
        total.merge(raw_sums(load_imatrix(f), data.chunk_size), what=str(f))
    total.merge(data, what="the calibration run")
    return total, [str(f) for f in in_files]


def _stamp(model: Any, calibration: str | Path | None, chunk: int, chunks: int, all_experts: bool,
           in_files: list[str], options: LicenseOptions | None) -> Any:
    from license.stamp import derive_stamp

    source = model.open_source()
    try:
        op = {"op": "imatrix", "calibration": Path(calibration).name if calibration else None, "chunk_size": chunk,
              "chunks": chunks, "all_experts": all_experts, "in_files": [Path(f).name for f in in_files]}
        return derive_stamp(model.stamp_input(source), op, options, suffix="imatrix")
    finally:
        source.close()
