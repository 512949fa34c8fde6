"""How far a pruned or extracted model is from its original on held-out text: next-token KL
divergence KL(original || other), top-1 agreement and both perplexities, each model run
layer-streamed and the vocabulary projection done a few positions at a time."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolbox.progress import NULL_PROGRESS, Progress

POSITIONS_PER_CHUNK = 128


@dataclass
class Comparison:
    original: str
    other: str
    tokens: int  # predicted positions compared
    kl: float  # mean KL(original || other) in nats per position
    top1_agreement: float
    perplexity_original: float
    perplexity_other: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_models(original: str | Path, other: str | Path, calibration: str | Path | None = None, *,
                   sequences: list[list[int]] | None = None, max_tokens: int = 2048, seq_len: int = 512,
                   dtype: str = "float32", progress: Progress = NULL_PROGRESS) -> Comparison:
    """Compare two models with the same vocabulary on the same tokens (the original's tokenizer)."""
    import torch

    from toolbox.errors import UsageError
    from toolbox.experts.calibration import calibration_sequences
    from toolbox.experts.forward import chunks, open_streamed

    with open_streamed(original, dtype=dtype) as a, open_streamed(other, dtype=dtype) as b:
        if a.ckpt.text.vocab != b.ckpt.text.vocab or a.ckpt.text.hidden != b.ckpt.text.hidden:
            raise UsageError(f"{other} does not share {original}'s vocabulary and width: not comparable")
        if sequences is None:
            if calibration is None:
                raise UsageError("comparison needs held-out text", hint="pass --calibration FILE (.txt or .jsonl)")
            sequences = calibration_sequences(calibration, a.path, max_tokens=max_tokens, seq_len=seq_len)
        ha = a.final_hidden(sequences, progress=progress, label="original")
        hb = b.final_hidden(sequences, progress=progress, label="other")
        head_a, head_b = a.lm_head(), b.lm_head()
    n = kl = agree = nll_a = nll_b = 0.0
    with torch.no_grad():
        for seq, xa, xb in zip(sequences, ha, hb, strict=True):
            target = torch.tensor(seq[1:], dtype=torch.long)
            for part in chunks(len(seq) - 1, POSITIONS_PER_CHUNK):
                la = torch.log_softmax((xa[part] @ head_a.T).double(), dim=-1)
                lb = torch.log_softmax((xb[part] @ head_b.T).double(), dim=-1)
                kl += float((la.exp() * (la - lb)).sum())
                agree += float((la.argmax(-1) == lb.argmax(-1)).sum())
                tgt = target[part].unsqueeze(1)
                nll_a -= float(la.gather(1, tgt).sum())
                nll_b -= float(lb.gather(1, tgt).sum())
                n += part.stop - part.start
    if not n:
        raise UsageError("no position to compare (every sequence is shorter than 2 tokens)")
    return Comparison(str(original), str(other), int(n), kl / n, agree / n, math.exp(nll_a / n), math.exp(nll_b / n))
