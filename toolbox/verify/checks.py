"""Structural and tokenizer checks of an HF Llama 4 checkpoint, as findings with stable codes.

Severity: `fatal` means an input file cannot be used at all (exit 3, like any bad input),
`error` and `warning` mean the checkpoint is wrong or suspicious (exit 1), `info` is
reported but does not fail. Without --deep only headers and the tokenizer are read.
"""

from __future__ import annotations

import hashlib
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
    shard_part = VerifyReport(path=report.path)
    headers = _check_shards(root, shard_part)  # first: the byte scan needs only the headers
    from toolbox.verify.deep import deep_scan

    with ThreadPoolExecutor(1, thread_name_prefix="corral-deep-scan") as pool:
        # the byte scan (I/O and torch kernels) runs while config, inventory and tokenizer are checked
        # (Python); findings keep the order config, shards, inventory, tokenizer, deep, as if run in turn
        deep_part = VerifyReport(path=report.path)
        scan = pool.submit(deep_scan, headers, deep_part, progress) if deep and headers is not None else None
        ckpt = _check_config(root, report)
        report.findings.extend(shard_part.findings)
        report.checked.update(shard_part.checked)
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
