"""Per-layer, per-expert router statistics over calibration tokens, computed layer-streamed.

For each MoE layer and expert: how often it is selected (frequency), the mean router
probability sigmoid(logit) over all tokens, the mean gate value over the tokens routed to it,
the mean L2 norm of its output on those tokens, REAP saliency (mean over routed tokens of gate
value x output norm, arXiv 2510.13999) and EAN (expert activation norm: summed output norm over
routed tokens, per calibration token). The expert output is the expert applied to the token's
un-scaled FFN input, as REAP defines it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    import torch

CRITERIA = ("frequency", "reap", "ean")  # "random" (seeded) is the baseline, needing no statistics


@dataclass
class ExpertStats:
    layer: int
    expert: int
    selected: int = 0
    frequency: float = 0.0  # share of tokens routing to it
    mean_prob: float = 0.0  # mean sigmoid(router logit) over all tokens
    mean_score: float = 0.0  # mean gate value over routed tokens
    mean_output_norm: float = 0.0  # mean ||expert(x)|| over routed tokens
    reap: float = 0.0  # mean gate value x ||expert(x)|| over routed tokens
    ean: float = 0.0  # sum ||expert(x)|| over routed tokens / all tokens

    def score(self, criterion: str) -> float:
        return {"frequency": self.frequency, "reap": self.reap, "ean": self.ean}[criterion]


@dataclass
class RouterStats:
    source: str
    tokens: int
    experts: int
    top_k: int
    layers: dict[int, list[ExpertStats]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "tokens": self.tokens, "experts": self.experts, "top_k": self.top_k,
                "layers": {str(k): [asdict(e) for e in v] for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterStats:
        """Read back what `to_dict` (and `corral experts stats --json`) wrote."""
        layers = {int(k): [ExpertStats(**e) for e in v] for k, v in data["layers"].items()}
        return cls(str(data.get("source", "")), int(data["tokens"]), int(data["experts"]), int(data["top_k"]), layers)

    def rows(self) -> list[ExpertStats]:
        return [e for v in self.layers.values() for e in v]

    def most_used(self) -> dict[int, int]:
        """Each layer's most selected expert (ties: higher REAP, then lower id)."""
        return {k: max(v, key=lambda e: (e.selected, e.reap, -e.expert)).expert for k, v in self.layers.items()}

    def keep_top(self, count: int, criterion: str) -> dict[int, list[int]]:
        """The `count` best experts of each layer by `criterion` (ties to the lower id)."""
        return {k: sorted(e.expert for e in sorted(v, key=lambda e: (-e.score(criterion), e.expert))[:count])
                for k, v in self.layers.items()}


class _Accumulator:
    def __init__(self, experts: int) -> None:
        import torch

        self.n = 0
        self.selected = torch.zeros(experts, dtype=torch.float64)
        self.prob = torch.zeros(experts, dtype=torch.float64)
        self.score = torch.zeros(experts, dtype=torch.float64)
        self.norm = torch.zeros(experts, dtype=torch.float64)
        self.saliency = torch.zeros(experts, dtype=torch.float64)


def expert_output(moe: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    """Routed expert `e` of a transformers Llama4TextMoe applied to inputs x [T, H]."""
    experts = moe.experts
    gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
    return (up * experts.act_fn(gate)) @ experts.down_proj[e]


def router_stats(src: str | Path, calibration: str | Path | None = None, *,
                 sequences: list[list[int]] | None = None, max_tokens: int = 2048, seq_len: int = 512,
                 dtype: str = "float32", progress: Progress = NULL_PROGRESS) -> RouterStats:
    """Run calibration tokens through the model one layer at a time and gather router statistics."""
    import torch

    from toolbox.errors import UsageError
    from toolbox.experts.calibration import calibration_sequences
    from toolbox.experts.forward import open_streamed

    with open_streamed(src, dtype=dtype) as model:
        t = model.ckpt.text
        if not t.moe_layers:
            raise UsageError(f"{src}: no MoE layer, so no router to measure")
        if sequences is None:
            if calibration is None:
                raise UsageError("statistics need calibration data", hint="pass --calibration FILE (.txt or .jsonl)")
            sequences = calibration_sequences(calibration, model.path, max_tokens=max_tokens, seq_len=seq_len)
        acc = {i: _Accumulator(t.experts) for i in t.moe_layers}

        def on_moe(i: int, layer: Any, x: torch.Tensor) -> None:
            moe, a = layer.feed_forward, acc[i]
            logits = torch.nn.functional.linear(x, moe.router.weight)
            top_v, top_i = torch.topk(logits, t.top_k, dim=1)
            gates = torch.sigmoid(top_v.float())
            a.n += x.shape[0]
            a.prob += torch.sigmoid(logits.double()).sum(0)
            for e in top_i.unique().tolist():
                rows, slot = (top_i == e).nonzero(as_tuple=True)
                g = gates[rows, slot].double()
                norm = expert_output(moe, e, x[rows]).double().norm(dim=-1)
                a.selected[e] += len(rows)
                a.score[e] += g.sum()
                a.norm[e] += norm.sum()
                a.saliency[e] += (g * norm).sum()

        model.final_hidden(sequences, on_moe=on_moe, progress=progress, label="statistics")
    tokens = sum(len(s) for s in sequences)
    out = RouterStats(str(src), tokens, t.experts, t.top_k)
    for i, a in acc.items():
        rows = []
        for e in range(t.experts):
            k = float(a.selected[e])
            rows.append(ExpertStats(
                layer=i, expert=e, selected=int(k), frequency=k / a.n, mean_prob=float(a.prob[e]) / a.n,
                mean_score=float(a.score[e]) / k if k else 0.0, mean_output_norm=float(a.norm[e]) / k if k else 0.0,
                reap=float(a.saliency[e]) / k if k else 0.0, ean=float(a.norm[e]) / a.n))
        out.layers[i] = rows
    return out


def stats_csv(stats: RouterStats) -> str:
    cols = ["layer", "expert", "selected", "frequency", "mean_prob", "mean_score", "mean_output_norm", "reap", "ean"]
    lines = [",".join(cols)]
    for e in stats.rows():
        d = asdict(e)
        lines.append(",".join(str(d[c]) if isinstance(d[c], int) else f"{d[c]:.8g}" for c in cols))
    return "\n".join(lines) + "\n"


def load_stats(path: str | Path) -> RouterStats:
    """Statistics saved by `corral experts stats --json`; BadInputError when unreadable."""
    import json

    from toolbox.errors import BadInputError

    p = Path(path)
    try:
        return RouterStats.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{p}: not statistics written by corral experts stats --json ({exc})", path=p) from None
