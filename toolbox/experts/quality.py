"""Measured quality of GGUF files against their HF source: next-token KL divergence, top-1 agreement and
perplexity on calibration text.

The GGUF runs in llama.cpp (llama-cpp-python, every position's logits). The source runs in transformers,
layer-streamed in float32 (memory: one decoder layer plus activations), so the reference is an
independent implementation and needs no full-size float GGUF on disk; the F32 GGUF of the same
checkpoint measures KL ~0 and top-1 1.0 against it, which checks the two runtimes agree. Or the source
is a GGUF (the BF16 or F32 GGUF of the checkpoint), run in llama.cpp like the files, tokenized by its
own vocabulary: what llama-perplexity --kl-divergence compares with. The text is cut into chunks of
`ctx` tokens as llama-imatrix / llama-perplexity cut it (BOS first, tail dropped). Every position of a
chunk that has a next token is scored: KL(source || gguf) in nats, its mean and 99th percentile; top-1
agreement of the two argmaxes; perplexity of the actual next tokens under each. The source's logits are
computed once for all files into a temporary file (positions x vocabulary float32: 3.3 GB for 8 chunks
of 512 at Llama 4's vocabulary of 202,048) and read back a block of positions at a time, so memory stays
at one block of vocabulary-sized rows per model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, UsageError
from toolbox.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    import numpy as np

DEFAULT_CTX = 512
DEFAULT_CHUNKS = 8
MIN_CTX, MAX_CTX = 16, 4096
MAX_CHUNKS = 256
MAX_FILES = 32
BLOCK = 64  # positions per log-softmax block


@dataclass
class VariantQuality:
    file: str
    size_bytes: int
    outtype: str
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity: float
    source_perplexity: float

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "size_bytes": self.size_bytes, "outtype": self.outtype,
                "kl_divergence": {"mean": self.kl_mean, "p99": self.kl_p99}, "top1_agreement": self.top1_agreement,
                "perplexity": self.perplexity, "source_perplexity": self.source_perplexity}


@dataclass
class QualityReport:
    source: str
    tokens: int  # positions scored per file
    variants: list[VariantQuality] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"variants": [v.to_dict() for v in self.variants], "source": self.source, "tokens": self.tokens}


def gguf_outtype(path: Path) -> str:
    """The file's general.file_type as an --outtype name (q4_k_m, f32, ...), or "unknown"."""
    import gguf

    from toolbox.tensors.gguf.reader import GGUFFile

    ft = GGUFFile(path).fields.get("general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "unknown"


def evaluate_gguf(files: Sequence[str | Path], against: str | Path, calibration: str | Path, *,
                  ctx: int = DEFAULT_CTX, chunks: int = DEFAULT_CHUNKS, threads: int | None = None,
                  progress: Progress = NULL_PROGRESS) -> QualityReport:
    """KL divergence, top-1 agreement and perplexity of each GGUF in `files` against `against` (an HF
    checkpoint or demo:*, run in transformers; or a GGUF, run in llama.cpp), on `chunks` chunks of `ctx`
    tokens of `calibration` (see the module docstring). The reference's logits are computed once, into a
    temporary file (positions x vocabulary float32, under $TMPDIR), and read back a block at a time per file."""
    import tempfile

    if not files:
        raise UsageError("no GGUF file to evaluate")
    if len(files) > MAX_FILES:
        raise UsageError(f"at most {MAX_FILES} GGUF files per run")
    if not MIN_CTX <= ctx <= MAX_CTX:
        raise UsageError(f"--ctx {ctx}: choose {MIN_CTX}..{MAX_CTX} tokens")
    if not 1 <= chunks <= MAX_CHUNKS:
        raise UsageError(f"--chunks {chunks}: choose 1..{MAX_CHUNKS}")
    paths = [Path(f) for f in files]
    for p in [*paths, *([Path(against)] if is_gguf_reference(against) else [])]:
        if not p.is_file() or p.suffix != ".gguf":
            raise BadInputError(f"{p}: not a .gguf file", path=p)
    with tempfile.TemporaryDirectory(prefix="corral-eval-") as tmp:
        if is_gguf_reference(against):
            ref = _llama_cpp_reference(Path(against), calibration, ctx, chunks, threads, Path(tmp), progress)
        else:
            ref = _transformers_reference(against, calibration, ctx, chunks, Path(tmp), progress)
        report = QualityReport(str(against), ref.positions)
        with progress.task("GGUF files (llama.cpp)", total=len(paths), unit="files") as task:
            for p in paths:
                report.variants.append(_one(p, ref, ctx, threads))
                task.advance()
        del ref  # the memory map, before its directory goes
    return report


def is_gguf_reference(against: str | Path) -> bool:
    """A reference named by a .gguf path runs in llama.cpp; anything else is an HF checkpoint (or demo:*)."""
    return str(against).lower().endswith(".gguf")


@dataclass
class _Reference:
    """The reference's next-token logits of every scored position, computed once for all files."""

    seqs: list[list[int]]
    logits: Any  # numpy memmap [positions, vocab] float32; sequence i's rows start at offsets[i]
    offsets: list[int]
    vocab: int

    @property
    def positions(self) -> int:
        return sum(len(s) - 1 for s in self.seqs)


def _logits_file(tmp: Path, seqs: list[list[int]], vocab: int) -> tuple[Any, list[int]]:
    import numpy as np

    from toolbox.tensors.atomic import ensure_free_space

    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s) - 1)
    ensure_free_space(tmp, offsets[-1] * vocab * 4, "the reference logits (set TMPDIR elsewhere for more room)")
    return np.lib.format.open_memmap(tmp / "reference.npy", mode="w+", dtype=np.float32,
                                     shape=(offsets[-1], vocab)), offsets[:-1]


def _transformers_reference(against: str | Path, calibration: str | Path, ctx: int, chunks: int, tmp: Path,
                            progress: Progress) -> _Reference:
    """transformers, layer-streamed in float32: final hidden states, then the head a block at a time."""
    from toolbox.experts.forward import open_streamed
    from toolbox.experts.imatrix import imatrix_chunks

    with open_streamed(against) as model:
        seqs = imatrix_chunks(calibration, model.path, ctx, chunks)
        hidden = model.final_hidden(seqs, progress=progress, label="source (transformers)")
        head = model.lm_head()
        vocab = model.config.vocab_size
    logits, offsets = _logits_file(tmp, seqs, vocab)
    for seq, h, off in zip(seqs, hidden, offsets, strict=True):
        for start in range(0, len(seq) - 1, BLOCK):
            stop = min(len(seq) - 1, start + BLOCK)
            logits[off + start:off + stop] = (h[start:stop] @ head.T).float().numpy()
    return _Reference(seqs, logits, offsets, vocab)


def llama_cpp_chunks(path: Path, calibration: str | Path, ctx: int, chunks: int) -> list[list[int]]:
    """Token chunks as llama-imatrix / llama-perplexity cut them, tokenized by the GGUF's own vocabulary
    (llama.cpp's tokenizer; plain text, special tokens read as text): `ctx` tokens each, BOS first."""
    import llama_cpp

    from toolbox.experts.calibration import read_texts
    from toolbox.experts.imatrix import MAX_CALIBRATION_BYTES

    p = Path(calibration)
    if p.is_file() and p.stat().st_size > MAX_CALIBRATION_BYTES:
        raise BadInputError(f"{p}: {p.stat().st_size} bytes of calibration text (at most {MAX_CALIBRATION_BYTES})",
                            path=p)
    texts, _chats = read_texts(p)
    if texts is None:
        raise UsageError(f"{p}: chat records need the HF source's chat template",
                         hint="pass --against the HF checkpoint, or plain text (.txt, or .jsonl with \"text\")")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        ids: list[int] = []
        for t in texts:
            ids.extend(vocab.tokenize(t.encode("utf-8"), add_bos=True, special=False))
        bos = vocab.token_bos()
    finally:
        vocab.close()
    n = min(chunks, len(ids) // ctx)
    if n < 1:
        raise BadInputError(f"{p}: {len(ids)} tokens, fewer than one chunk of {ctx}", path=p,
                            hint="use more text or a smaller --ctx")
    out = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    if bos >= 0:
        for c in out:
            c[0] = bos
    return out


def _llama_cpp_reference(path: Path, calibration: str | Path, ctx: int, chunks: int, threads: int | None,
                         tmp: Path, progress: Progress) -> _Reference:
    """A GGUF reference (the BF16 or F32 GGUF of the source) in llama.cpp, every position's logits."""
    import numpy as np

    seqs = llama_cpp_chunks(path, calibration, ctx, chunks)
    llm = _open(path, ctx, threads)
    try:
        vocab = llm.n_vocab()
        logits, offsets = _logits_file(tmp, seqs, vocab)
        with progress.task("source (llama.cpp)", total=len(seqs), unit="chunks") as task:
            for seq, off in zip(seqs, offsets, strict=True):
                llm.reset()
                llm.eval(seq)
                logits[off:off + len(seq) - 1] = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float32)
                task.advance()
    finally:
        llm.close()
    return _Reference(seqs, logits, offsets, vocab)


def _open(path: Path, ctx: int, threads: int | None) -> Any:
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                           n_threads=threads or os.cpu_count() or 1)


def _one(path: Path, ref: _Reference, ctx: int, threads: int | None) -> VariantQuality:
    import numpy as np

    llm = _open(path, ctx, threads)
    try:
        if llm.n_vocab() != ref.vocab:
            raise BadInputError(f"{path}: a vocabulary of {llm.n_vocab()}, the source has {ref.vocab}: not comparable",
                                path=path)
        kls: list[np.ndarray] = []
        agree = nll_q = nll_p = 0.0
        for seq, off in zip(ref.seqs, ref.offsets, strict=True):
            llm.reset()
            llm.eval(seq)
            q_logits = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float32)
            target = np.asarray(seq[1:], dtype=np.int64)
            for start in range(0, len(seq) - 1, BLOCK):
                stop = min(len(seq) - 1, start + BLOCK)
                p_logits = np.asarray(ref.logits[off + start:off + stop])
                kl, same, lp, lq = token_metrics(p_logits, q_logits[start:stop], target[start:stop])
                kls.append(kl)
                agree += same
                nll_p -= lp
                nll_q -= lq
    finally:
        llm.close()
    allkl = np.concatenate(kls)
    n = allkl.size
    return VariantQuality(str(path), path.stat().st_size, gguf_outtype(path), float(allkl.mean()),
                          float(np.percentile(allkl, 99)), agree / n, math.exp(nll_q / n), math.exp(nll_p / n))


def token_metrics(p_logits: np.ndarray, q_logits: np.ndarray,
                  target: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """Per position KL(P || Q) (nats), and summed top-1 agreement, log P(target) and log Q(target)."""
    import numpy as np

    lp = _log_softmax(p_logits.astype(np.float64))
    lq = _log_softmax(q_logits.astype(np.float64))
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)
    same = float((lp.argmax(-1) == lq.argmax(-1)).sum())
    rows = np.arange(target.size)
    return kl, same, float(lp[rows, target].sum()), float(lq[rows, target].sum())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    import numpy as np

    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
