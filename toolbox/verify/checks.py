"""Structural and tokenizer checks of an HF Llama 4 checkpoint, as findings with stable codes.

Severity: `fatal` means an input file cannot be used at all (exit 3, like any bad input),
`error` and `warning` mean the checkpoint is wrong or suspicious (exit 1), `info` is
reported but does not fail. Without --deep only headers and the tokenizer are read.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolbox.checkpoint import Llama4Checkpoint, from_config, read_config
from toolbox.errors import CorralError, CorruptFileError, ExitCode, UsageError
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.safetensors_format import FLOAT_DTYPES, SafetensorsHeader, read_header
from toolbox.tensors.sink import INDEX_NAME

SEVERITIES = ("fatal", "error", "warning", "info")
ROUNDTRIP_SAMPLE = "Llama 4 says: héllo wörld, 你好 🦙 — `x = 3.14159` \n\n  tabs\tand  spaces"


@dataclass
class Finding:
    code: str
    severity: str
    message: str
    path: str | None = None
    tensor: str | None = None


@dataclass
class VerifyReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)
    tensor_stats: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, code: str, severity: str, message: str, **where: str | None) -> None:
        self.findings.append(Finding(code, severity, message, **where))

    @property
    def exit_code(self) -> ExitCode:
        sev = {f.severity for f in self.findings}
        if "fatal" in sev:
            return ExitCode.BAD_INPUT
        if sev & {"error", "warning"}:
            return ExitCode.FINDINGS
        return ExitCode.OK

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "exit_code": int(self.exit_code),
            "findings": [asdict(f) for f in self.findings],
            "checked": self.checked,
            **({"tensor_stats": self.tensor_stats} if self.tensor_stats else {}),
        }


def verify_checkpoint(path: str | Path, *, deep: bool = False, against: str | Path | None = None,
                      run: bool = False, progress: Progress = NULL_PROGRESS) -> VerifyReport:
    """Check an HF Llama 4 checkpoint directory, a GGUF file or an ONNX export; never raises for
    problems in the files.

    `against` (GGUF only): the HF checkpoint the GGUF was made from, compared tensor by tensor.
    `run` (ONNX only): greedy-decode a few tokens in onnxruntime and in transformers and compare.
    """
    from toolbox.reference import resolve_path

    root = resolve_path(path, progress=progress)
    report = VerifyReport(path=str(root))
    is_gguf = root.suffix == ".gguf" and root.is_file()
    if against is not None and not is_gguf:
        raise UsageError("--against compares a GGUF file with the HF checkpoint it was made from",
                         hint="give a .gguf file as PATH, e.g. corral verify model.gguf --against ./hf-dir")
    if is_gguf:
        from toolbox.verify.gguf_checks import verify_gguf

        verify_gguf(root, report)
        if against is not None and not any(f.severity == "fatal" for f in report.findings):
            from toolbox.verify.against import verify_against

            verify_against(root, against, report, progress)
        return report
    if not root.exists():
        report.add("input.missing", "fatal", f"{root}: no such file or directory", path=str(root))
        return report
    from toolbox.verify.onnx_checks import is_onnx, verify_onnx

    if is_onnx(root):
        verify_onnx(root, report)
        if run and not any(f.severity in ("fatal", "error") for f in report.findings):
            from toolbox.verify.onnx_checks import run_against_transformers

            result = run_against_transformers(root)
            report.checked["run"] = result
            runners = " and ".join(k for k in ("onnxruntime", "genai", "transformers") if result.get(k) is not None)
            if result["match"]:
                n = len(result["onnxruntime"])
                report.add("onnx.run", "info", f"{runners} decode the same {n} tokens greedily")
            else:
                report.add("onnx.run-mismatch", "error", f"greedy decode differs: onnxruntime {result['onnxruntime']}, "
                           f"genai {result.get('genai')}, transformers {result['transformers']}")
        return report
    if run:
        raise UsageError("--run decodes with onnxruntime: give a corral ONNX export directory or .onnx file")
    from toolbox.reference import ModelReference, ResolvedModel

    model = ResolvedModel(ModelReference.parse(root), root)
    if model.meta_dir is not None:  # Meta's original format: params.json checked against the shards
        from toolbox.verify.meta_checks import verify_meta

        verify_meta(model, report, deep=deep, progress=progress)
        return report
    ckpt = _check_config(root, report)
    headers = _check_shards(root, report)
    with ThreadPoolExecutor(1, thread_name_prefix="corral-deep-scan") as pool:
        # the byte scan (I/O and torch kernels) runs while the inventory and tokenizer are checked
        # (Python): its findings are appended after theirs, as if it had run last
        deep_part = VerifyReport(path=report.path)
        scan = pool.submit(_deep_scan, headers, deep_part, progress) if deep and headers is not None else None
        if ckpt is not None and headers is not None:
            _check_inventory(ckpt, root, report)
        if ckpt is not None:
            _check_tokenizer(ckpt, root, report)
        if scan is not None:
            scan.result()
            report.findings.extend(deep_part.findings)
            report.tensor_stats.update(deep_part.tensor_stats)
            report.checked.update(deep_part.checked)
    return report


# -- config -------------------------------------------------------------------------------------
def _check_config(root: Path, report: VerifyReport) -> Llama4Checkpoint | None:
    directory = root if root.is_dir() else root.parent
    try:
        ckpt = from_config(read_config(root), directory)
    except CorralError as exc:
        report.add("config.invalid", "fatal", exc.message, path=exc.path)
        return None
    t = ckpt.text
    cfg_path = str(directory / "config.json")
    report.checked["variant"] = ckpt.variant
    if not 1 <= t.top_k <= t.experts:
        report.add("config.top-k", "error", f"num_experts_per_tok={t.top_k} must be between 1 and "
                   f"num_local_experts={t.experts}", path=cfg_path)
    bad = [i for i in t.moe_layers if not 0 <= i < t.layers]
    if bad:
        report.add("config.moe-layers", "error", f"moe_layers names layers {bad} outside 0..{t.layers - 1}",
                   path=cfg_path)
    if t.interleave_step > 0:
        implied = tuple(range(t.interleave_step - 1, t.layers, t.interleave_step))
        if tuple(sorted(t.moe_layers)) != implied:
            report.add("config.moe-layers", "warning",
                       f"moe_layers {list(t.moe_layers)} disagrees with interleave_moe_layer_step="
                       f"{t.interleave_step} (implies {list(implied)})", path=cfg_path)
    elif t.moe_layers:
        report.add("config.moe-layers", "warning", "interleave_moe_layer_step=0 but moe_layers is not empty",
                   path=cfg_path)
    if t.kv_heads < 1 or t.heads % t.kv_heads:
        report.add("config.heads", "error", f"num_attention_heads={t.heads} is not a multiple of "
                   f"num_key_value_heads={t.kv_heads}", path=cfg_path)
    if t.head_dim % 2:
        report.add("config.heads", "error", f"head_dim={t.head_dim} must be even for rotary embeddings",
                   path=cfg_path)
    if len(t.rope_layers) != t.layers:
        report.add("config.no-rope-layers", "error", f"no_rope_layers has {len(t.rope_layers)} entries for "
                   f"{t.layers} layers", path=cfg_path)
    if t.chunk_size is not None and int(t.chunk_size) <= 0:
        report.add("config.chunk-size", "error", f"attention_chunk_size={t.chunk_size} must be positive",
                   path=cfg_path)
    tc = ckpt.config.get("text_config") or ckpt.config
    for key in ("bos_token_id", "pad_token_id"):
        v = tc.get(key)
        if isinstance(v, int) and not 0 <= v < t.vocab:
            report.add("config.token-id", "error", f"{key}={v} is outside the vocabulary (0..{t.vocab - 1})",
                       path=cfg_path)
    for key in ("image_token_index", "boi_token_index", "eoi_token_index"):
        v = ckpt.config.get(key)
        if isinstance(v, int) and not 0 <= v < t.vocab:
            report.add("config.token-id", "error", f"{key}={v} is outside the vocabulary", path=cfg_path)
    return ckpt


# -- shards and index ---------------------------------------------------------------------------
def _check_shards(root: Path, report: VerifyReport) -> list[SafetensorsHeader] | None:
    directory = root if root.is_dir() else root.parent
    index_path = directory / INDEX_NAME
    weight_map: dict[str, str] | None = None
    if root.is_dir() and index_path.is_file():
        from toolbox.tensors.safetensors_source import read_index

        try:
            weight_map = read_index(index_path)
        except CorruptFileError as exc:
            report.add("index.invalid", "fatal", exc.message, path=str(index_path))
            return None
        files = sorted(set(weight_map.values()))
    elif root.is_dir():
        files = sorted(p.name for p in directory.glob("*.safetensors") if not p.name.startswith("."))
    else:
        files = [root.name]
    if not files:
        report.add("shard.none", "fatal", f"{directory}: no safetensors files", path=str(directory))
        return None
    headers: list[SafetensorsHeader] = []
    fatal = False
    for name in files:
        p = directory / name
        if "/" in name or "\\" in name or name.startswith(".."):
            report.add("index.path", "fatal", f"{index_path}: shard name {name!r} escapes the checkpoint",
                       path=str(index_path))
            fatal = True
        elif not p.is_file():
            report.add("index.missing-shard", "fatal", f"{index_path}: names shard {name} which does not exist",
                       path=str(p))
            fatal = True
        else:
            try:
                headers.append(read_header(p))
            except CorruptFileError as exc:
                report.add("shard.corrupt", "fatal", exc.message, path=str(p))
                fatal = True
    seen: dict[str, str] = {}
    for h in headers:
        for t in h.tensors:
            if t in seen:
                report.add("shard.duplicate", "fatal", f"tensor {t!r} is stored in both {seen[t]} and {h.path.name}",
                           path=str(h.path), tensor=t)
                fatal = True
            seen[t] = h.path.name
    if weight_map is not None:
        for t, shard in weight_map.items():
            if seen.get(t, shard) != shard:
                report.add("index.mismatch", "fatal", f"index puts {t!r} in {shard} but it is in {seen[t]}",
                           path=str(index_path), tensor=t)
                fatal = True
            elif t not in seen and (directory / shard).is_file() and not fatal:
                report.add("index.mismatch", "fatal", f"index lists {t!r} in {shard}, which does not contain it",
                           path=str(index_path), tensor=t)
                fatal = True
        unlisted = sorted(set(seen) - set(weight_map))
        for t in unlisted:
            report.add("index.unlisted", "error", f"{seen[t]} holds {t!r} which the index does not list",
                       path=str(index_path), tensor=t)
    report.checked["shards"] = len(headers)
    report.checked["bytes"] = sum(h.file_size for h in headers)
    return None if fatal else headers


# -- tensor inventory ---------------------------------------------------------------------------
def _check_inventory(ckpt: Llama4Checkpoint, root: Path, report: VerifyReport) -> None:
    from toolbox.tensors.canonical import hf_view
    from toolbox.tensors.safetensors_source import SafetensorsSource

    try:
        view = hf_view(SafetensorsSource(root), ckpt.config)
    except CorralError as exc:
        report.add("tensor.layout", "fatal", exc.message, path=exc.path)
        return
    have = view.infos()
    expected = ckpt.expected_tensors()
    for name in expected.keys() - have.keys():
        report.add("tensor.missing", "error", f"missing tensor {name} {list(expected[name])}", tensor=name)
    for name in have.keys() - expected.keys():
        report.add("tensor.unexpected", "error", f"unexpected tensor {name} {list(have[name].shape)}", tensor=name)
    declared = ckpt.dtype
    for name in expected.keys() & have.keys():
        info = have[name]
        if info.shape != expected[name]:
            report.add("tensor.shape", "error", f"{name} has shape {list(info.shape)}, the config implies "
                       f"{list(expected[name])}", tensor=name)
        if info.dtype not in FLOAT_DTYPES:
            report.add("tensor.dtype", "error", f"{name} has non-float dtype {info.dtype}", tensor=name)
        elif declared and info.dtype != declared and not view.fp8:
            report.add("tensor.dtype", "warning", f"{name} is {info.dtype} but config.json declares {declared}",
                       tensor=name)
    report.checked["tensors"] = len(have)
    report.checked["layout"] = "per-expert" if view.per_expert else "fused"
    report.checked["fp8"] = view.fp8


# -- tokenizer ----------------------------------------------------------------------------------
def llama4_fingerprint(tok: Any) -> str:
    """llama.cpp's pre-tokenizer fingerprint: sha256 of str(ids) for its check text, BOS included."""
    from toolbox.tokenizer import LLAMA4_CHKTXT

    return hashlib.sha256(str(tok.encode(LLAMA4_CHKTXT)).encode()).hexdigest()


def _check_tokenizer(ckpt: Llama4Checkpoint, root: Path, report: VerifyReport) -> None:
    from toolbox.tokenizer_files import load_tokenizer_files

    directory = root if root.is_dir() else root.parent
    try:
        tok = load_tokenizer_files(directory)
    except CorralError as exc:
        report.add("tokenizer.unreadable", "fatal", exc.message, path=exc.path)
        return
    tpath = str(directory / "tokenizer.json")
    t = ckpt.text
    size = tok.vocab_size
    report.checked["tokenizer_vocab"] = size
    if size > t.vocab:
        report.add("tokenizer.vocab", "error", f"tokenizer has {size} tokens but the embedding has {t.vocab} rows",
                   path=tpath)
    tc = ckpt.config.get("text_config") or ckpt.config
    pairs: list[tuple[str, str | None, Any]] = [
        ("bos_token_id", tok.special_token("bos_token"), tc.get("bos_token_id")),
        ("pad_token_id", tok.special_token("pad_token"), tc.get("pad_token_id")),
    ]
    eos_tok = tok.special_token("eos_token")
    eos_cfg = tc.get("eos_token_id")
    eos_ids = eos_cfg if isinstance(eos_cfg, list) else [eos_cfg] if eos_cfg is not None else []
    if eos_tok is not None and eos_ids and tok.token_id(eos_tok) not in eos_ids:
        report.add("tokenizer.special-id", "error", f"eos_token {eos_tok!r} is id {tok.token_id(eos_tok)}, not one "
                   f"of the config's eos_token_id {eos_ids}", path=tpath)
    for key, token, cfg_id in pairs:
        if token is None or cfg_id is None:
            continue
        tid = tok.token_id(token)
        if tid != cfg_id:
            report.add("tokenizer.special-id", "error", f"{token!r} is id {tid} in the tokenizer but config "
                       f"{key} is {cfg_id}", path=tpath)
    for key, token in (("boi_token_index", "<|image_start|>"), ("eoi_token_index", "<|image_end|>"),
                       ("image_token_index", "<|patch|>")):
        cfg_id = ckpt.config.get(key)
        if ckpt.multimodal and cfg_id is not None and tok.token_id(token) is not None \
                and tok.token_id(token) != cfg_id:
            report.add("tokenizer.special-id", "error", f"{token!r} is id {tok.token_id(token)} but config {key} "
                       f"is {cfg_id}", path=tpath)
    ids = tok.encode(ROUNDTRIP_SAMPLE, add_special_tokens=False)
    if tok.decode(ids) != ROUNDTRIP_SAMPLE:
        report.add("tokenizer.roundtrip", "error", "decode(encode(text)) does not give the text back", path=tpath)
    if tok.token_id("<|header_start|>") is not None:  # a Llama 4 tokenizer: it must be the real one
        fp = llama4_fingerprint(tok)
        report.checked["tokenizer_fingerprint"] = fp
        from toolbox.tokenizer import LLAMA4_FINGERPRINT

        if fp != LLAMA4_FINGERPRINT:
            report.add("tokenizer.fingerprint", "error", "the tokenizer does not tokenize like Llama 4's "
                       "(llama.cpp pre-tokenizer fingerprint differs; check the pre-tokenizer and BOS handling)",
                       path=tpath)
    if tok.chat_template is None:
        report.add("tokenizer.chat-template", "info", "no chat template (fine for a base model)", path=tpath)


# -- deep scan ----------------------------------------------------------------------------------
DEEP_CHUNK_BYTES = 8 * 1024**2  # read and reduced by one worker while it is still in that core's cache
DEEP_EXTRA_WORKERS = 2  # workers beyond one per core: reads stay in flight while others compute
BF16_ROW = 4096
Part = tuple[int, int, int, float, float, float, float]  # n, nan, inf, sum, sum of squares, min, max


def chunk_stats(x: Any) -> Part:
    """The statistics of one chunk, reduced where it lies, by vectorised kernels that read it and write
    nothing: min/max (which also tells whether NaN/Inf is present: aminmax propagates NaN, and an Inf is the
    min or the max), then row sums and row norms. bf16 stays bf16 (a conversion pass costs more than the
    three reductions); the kernels accumulate in float32 and round each 4096-element row's result to bf16
    (2**-9 relative), and the rows are summed in float64, where those errors average out: ~4 significant
    digits for a tensor of many rows, what a health check needs. Only a chunk holding NaN/Inf is counted with masks."""
    import torch

    nan = inf = 0
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        nan_mask, inf_mask = torch.isnan(x), torch.isinf(x)
        nan, inf = int(nan_mask.sum()), int(inf_mask.sum())
        x = x[~(nan_mask | inf_mask)]
        if not x.numel():
            return 0, nan, inf, 0.0, 0.0, math.inf, -math.inf
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
    if x.dtype == torch.bfloat16 and x.numel() % BF16_ROW == 0:
        rows = x.view(-1, BF16_ROW)
        s = float(rows.sum(dim=1).double().sum())
        ss = float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())
    else:
        x = x.float()
        s, ss = float(x.sum()), float(torch.dot(x, x))
    return x.numel(), nan, inf, s, ss, lo_f, hi_f


class _Stats:
    """Running per-tensor statistics over chunks (float64 accumulators), folded in file order."""

    def __init__(self) -> None:
        self.n = self.nan = self.inf = 0
        self.s = self.ss = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, x: Any) -> None:
        """Fold in a chunk (bf16 with whole 4096-element rows natively, anything else as float32)."""
        self.fold(chunk_stats(x))

    def fold(self, part: Part) -> None:
        n, nan, inf, s, ss, lo, hi = part
        self.n, self.nan, self.inf = self.n + n, self.nan + nan, self.inf + inf
        self.s, self.ss = self.s + s, self.ss + ss
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def summary(self) -> dict[str, float]:
        mean = self.s / self.n if self.n else 0.0
        std = math.sqrt(max(self.ss / self.n - mean * mean, 0.0)) if self.n and self.lo != self.hi else 0.0
        return {"min": self.lo if self.n else 0.0, "max": self.hi if self.n else 0.0, "mean": mean, "std": std,
                "nan": self.nan, "inf": self.inf}


def _chunks(headers: list[SafetensorsHeader]) -> list[tuple[SafetensorsHeader, Any, int, int]]:
    """(shard, tensor entry, absolute begin, end) pieces of at most DEEP_CHUNK_BYTES, whole elements."""
    from toolbox.tensors.safetensors_format import DTYPES

    out = []
    for h in headers:
        for e in sorted(h.tensors.values(), key=lambda e: e.begin):
            step = DEEP_CHUNK_BYTES - DEEP_CHUNK_BYTES % DTYPES[e.dtype][0]
            out.extend((h, e, pos, min(pos + step, e.end)) for pos in range(e.begin, e.end, step))
    return out


class _Reader:
    """Positioned reads of shard files through the page cache with the kernel's sequential read-ahead
    (on the reference VM, direct reads of the same files were capped at half the buffered rate), each
    range dropped from the cache once read: a checkpoint is read once, and hundreds of GB passing
    through would evict everything else."""

    def __init__(self) -> None:
        import threading

        self.fds: dict[Path, int] = {}
        self.lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self.fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return self.fds[path]

    def read(self, path: Path, slot: Any, begin: int, length: int) -> tuple[Any, int]:
        """(uint8 view of the bytes in `slot`, how many were read) for [begin, begin + length)."""
        fd = self._fd(path)
        got = _pread_all(fd, slot, begin, length)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, begin, length, os.POSIX_FADV_DONTNEED)
        return slot[:length], got

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _pread_all(fd: int, buf: Any, begin: int, length: int) -> int:
    view = memoryview(buf.numpy())[:length]
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], begin + done)
        if n == 0:
            break
        done += n
    return done


def _scan_pieces(pieces: list[tuple[SafetensorsHeader, Any, int, int]], task: Any) -> Iterator[tuple[int, Part | None]]:
    """(bytes read, statistics or None) per piece, in order. Each worker reads a piece into its slot and
    reduces it at once, single-threaded (torch's own threads wait on each other in lock step, four times
    slower on a busy machine); a few more workers than cores keep several reads in flight."""
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    from toolbox.tensors.safetensors_format import DTYPES

    workers = max(1, min(4, os.cpu_count() or 1)) + DEEP_EXTRA_WORKERS
    window = workers + 1
    slots = [torch.empty(DEEP_CHUNK_BYTES, dtype=torch.uint8) for _ in range(min(window, len(pieces)))]
    wide: dict[int, Any] = {}  # slot -> float32 buffer, for chunks that are not bf16
    reader = _Reader()

    def work(i: int) -> tuple[int, Part | None]:
        h, e, begin, end = pieces[i]
        slot = i % window
        raw, got = reader.read(h.path, slots[slot], begin, end - begin)
        if got != end - begin or e.dtype not in FLOAT_DTYPES:
            return got, None
        x = raw.view(getattr(torch, DTYPES[e.dtype][1]))
        if x.dtype != torch.bfloat16:  # into a reused buffer: converting into fresh memory is 7x slower
            if slot not in wide:
                wide[slot] = torch.empty(DEEP_CHUNK_BYTES, dtype=torch.float32)  # room for 1-byte dtypes
            x = wide[slot][: x.numel()].copy_(x)
        return got, chunk_stats(x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    futures: dict[int, Future[tuple[int, Part | None]]] = {}
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="corral-deep") as pool:
            try:
                for i in range(min(window, len(pieces))):
                    futures[i] = pool.submit(work, i)
                for i in range(len(pieces)):
                    result = futures.pop(i).result()
                    if i + window < len(pieces):  # slot i % window is free again
                        futures[i + window] = pool.submit(work, i + window)
                    task.advance(result[0])
                    yield result
            finally:
                for f in futures.values():
                    f.cancel()
    finally:
        torch.set_num_threads(threads)
        reader.close()


def _deep_scan(headers: list[SafetensorsHeader], report: VerifyReport, progress: Progress) -> None:
    """Read every byte once, in bounded chunks read and reduced by one worker per core: NaN/Inf counts and
    per-tensor statistics."""
    pieces = _chunks(headers)
    total = sum(end - begin for _h, _e, begin, end in pieces)
    stats: dict[str, _Stats] = {}
    with progress.task("reading (bytes)", total=total) as task:
        scan = _scan_pieces(pieces, task)
        try:
            for (h, e, begin, end), (got, part) in zip(pieces, scan, strict=True):
                if got != end - begin:
                    report.add("shard.truncated", "fatal", f"{h.path}: short read in {e.name}", path=str(h.path),
                               tensor=e.name)
                    return
                if part is not None:
                    stats.setdefault(e.name, _Stats()).fold(part)
        finally:
            scan.close()
    for h in headers:
        for e in h.tensors.values():
            if e.name not in stats:
                continue
            summary = stats[e.name].summary()
            report.tensor_stats[e.name] = summary
            if summary["nan"]:
                report.add("deep.nan", "error", f"{e.name} has {summary['nan']} NaN values", tensor=e.name,
                           path=str(h.path))
            if summary["inf"]:
                report.add("deep.inf", "error", f"{e.name} has {summary['inf']} infinite values", tensor=e.name,
                           path=str(h.path))
            if summary["std"] == 0.0 and e.numel > 1 and not e.name.endswith(("norm.weight", ".bias")):
                report.add("deep.constant", "warning", f"{e.name} is constant ({summary['mean']:g})", tensor=e.name,
                           path=str(h.path))
    report.checked["bytes_read"] = total
