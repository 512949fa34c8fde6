"""Measured quality of GGUF files against their HF source: next-token KL divergence, top-1 agreement and
perplexity on calibration text.

The GGUF runs in llama.cpp (llama-cpp-python, every position's logits); the source runs in transformers,
layer-streamed in float32 (memory: one decoder layer plus activations), so the reference is an
independent implementation and needs no full-size float GGUF on disk; the F32 GGUF of the same
checkpoint measures KL ~0 and top-1 1.0 against it, which checks the two runtimes agree. The text is cut
into chunks of `ctx` tokens as llama-imatrix / llama-perplexity cut it (BOS first, tail dropped). Every
position of a chunk that has a next token is scored: KL(source || gguf) in nats, its mean and 99th
percentile; top-1 agreement of the two argmaxes; perplexity of the actual next tokens under each.
Source logits are recomputed from cached final hidden states for each file, a block of positions at a
time, so memory stays at one block of vocabulary-sized rows per model.
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
    """KL divergence, top-1 agreement and perplexity of each GGUF in `files` against the HF checkpoint
    `against`, on `chunks` chunks of `ctx` tokens of `calibration` (see the module docstring)."""
    from toolbox.experts.forward import open_streamed
    from toolbox.experts.imatrix import imatrix_chunks

    if not files:
        raise UsageError("no GGUF file to evaluate")
    if len(files) > MAX_FILES:
        raise UsageError(f"at most {MAX_FILES} GGUF files per run")
    if not MIN_CTX <= ctx <= MAX_CTX:
        raise UsageError(f"--ctx {ctx}: choose {MIN_CTX}..{MAX_CTX} tokens")
    if not 1 <= chunks <= MAX_CHUNKS:
        raise UsageError(f"--chunks {chunks}: choose 1..{MAX_CHUNKS}")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file() or p.suffix != ".gguf":
            raise BadInputError(f"{p}: not a .gguf file", path=p)
    with open_streamed(against) as model:
        seqs = imatrix_chunks(calibration, model.path, ctx, chunks)
        hidden = model.final_hidden(seqs, progress=progress, label="source (transformers)")
        head = model.lm_head()
        vocab = model.config.vocab_size
    report = QualityReport(str(against), sum(len(s) - 1 for s in seqs))
    with progress.task("GGUF files (llama.cpp)", total=len(paths), unit="files") as task:
        for p in paths:
            report.variants.append(_one(p, seqs, hidden, head, vocab, ctx, threads))
            task.advance()
    return report


def _one(path: Path, seqs: list[list[int]], hidden: list[Any], head: Any, vocab: int, ctx: int,
         threads: int | None) -> VariantQuality:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                          n_threads=threads or os.cpu_count() or 1)
    try:
        if llm.n_vocab() != vocab:
            raise BadInputError(f"{path}: a vocabulary of {llm.n_vocab()}, the source has {vocab}: not comparable",
                                path=path)
        kls: list[np.ndarray] = []
        agree = nll_q = nll_p = 0.0
        for seq, h in zip(seqs, hidden, strict=True):
            llm.reset()
            llm.eval(seq)
            q_logits = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float32)
            target = np.asarray(seq[1:], dtype=np.int64)
            for start in range(0, len(seq) - 1, BLOCK):
                stop = min(len(seq) - 1, start + BLOCK)
                p_logits = (h[start:stop] @ head.T).float().numpy()
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
