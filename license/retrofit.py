"""`corral license stamp`: put a stamp onto an existing artifact, in place.

Every file that changes is first written completely under a hidden `.NAME.corral-partial-*`
name beside it, and only when all of them are ready are they renamed over the originals (each
rename atomic). A failure or a kill before that point leaves the artifact untouched; no reader
ever sees a half-written file. Nothing loads a tensor:

- safetensors (HF shards, a PEFT adapter): the header changes size, so each file is rewritten
  as the new header followed by the old data section, copied in bounded chunks (offsets in a
  safetensors header are relative to the data section, so they stay valid).
- GGUF: the first file of a set (the only one with KV metadata) is rewritten with gguf-py,
  every key kept, the stamp's keys replaced, tensors copied as raw bytes piece by piece.
  Other parts of a split set are not touched.
- ONNX: the graph is loaded without external data, stamped and saved; weight files untouched.
- Sidecars (directories, or a lone file that already has some beside it): NOTICE, LICENSE,
  USE_POLICY.md, README.md.

Replacing something that names another license (a card saying apache-2.0, a LICENSE that is
not the verbatim text) or stamping a model not recognised as covered by the policy needs
`force`: corral never overwrites a user's statement silently.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license import keys as K
from license.artifact import Artifact, FileMeta, detect, read_file_meta, recognise
from license.card import read_card
from license.stamp import Stamp, apply_to_gguf_writer, apply_to_onnx, sidecar_contents
from toolbox.errors import BadInputError, OutputExistsError
from toolbox.tensors.atomic import new_partial

COPY_CHUNK = 16 * 1024**2


@dataclass
class StampResult:
    path: Path
    kind: str
    name: str
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "name": self.name,
                "written": [str(p) for p in self.written], "unchanged": [str(p) for p in self.unchanged]}


@dataclass
class ArtifactFacts:
    """What an artifact already says about itself: defaults for the stamp put on it."""

    kind: str
    name: str
    name_source: str
    base_model: str | None = None
    base_revision: str | None = None
    relation: str | None = None
    multimodal: bool = False
    policy_id: str | None = None
    evidence: list[str] = field(default_factory=list)


_SPLIT_TAIL = re.compile(r"-\d{5}-of-\d{5}$")
_HUB_URL = "https://huggingface.co/"


def describe(path: str | Path) -> ArtifactFacts:
    """Read the artifact's name, base model, relation and modality (headers only)."""
    art = detect(path)
    metas = [read_file_meta(f) for f in art.files]
    rec = recognise(art, metas)
    card = read_card(art.root / "README.md") if art.has_sidecars and (art.root / "README.md").is_file() else None
    names: list[tuple[str, str | None]] = []
    if card is not None and not card.error:
        names += [("model card", card.corral.get(K.CARD_MODEL_NAME)), ("model card title", card.title)]
    for m in metas:
        names += [(f"{m.path.name} {K.MODEL_NAME}", m.meta.get(K.MODEL_NAME)),
                  (f"{m.path.name} {K.GENERAL_NAME}", m.meta.get(K.GENERAL_NAME))]
    stem = art.path.name if art.is_directory else _SPLIT_TAIL.sub("", art.path.stem)
    names.append(("directory name" if art.is_directory else "file name", stem))
    source, name = next((s, n) for s, n in names if isinstance(n, str) and n.strip())
    base, revision, relation = _base_model(art, metas, card.data if card and not card.error else {})
    claimed_mm = any(m.meta.get(K.MULTIMODAL) == "true" for m in metas)
    return ArtifactFacts(kind=art.kind, name=name.strip(), name_source=source, base_model=base,
                         base_revision=revision, relation=relation, multimodal=rec.multimodal or claimed_mm,
                         policy_id=rec.policy.id if rec.policy else None, evidence=rec.evidence)


def _base_model(art: Artifact, metas: list[FileMeta], card: dict[str, Any]) -> tuple[str | None, str | None,
                                                                                       str | None]:
    base = card.get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    relation = card.get("base_model_relation")
    revision = None
    for m in metas:
        base = base or m.meta.get(K.BASE_MODEL)
        revision = revision or m.meta.get(K.BASE_REVISION)
        relation = relation or m.meta.get(K.BASE_RELATION)
        url = m.meta.get(f"{K.GENERAL_BASE_MODEL_PREFIX}0.repo_url", "")
        if not base and url.startswith(_HUB_URL):
            base = url[len(_HUB_URL):].strip("/")
    if not base and art.adapter_config:
        candidate = str(art.adapter_config.get("base_model_name_or_path") or "")
        if re.fullmatch(r"[\w.-]+/[\w.-]+", candidate) and not Path(candidate).exists():
            base = candidate
    if art.kind == "adapter":
        relation = relation or "adapter"
    from license.stamp import RELATIONS

    return (base if isinstance(base, str) else None), revision, (relation if relation in RELATIONS else None)


# -- the command ------------------------------------------------------------------------------------
def stamp_artifact(path: str | Path, stamp: Stamp, *, force: bool = False,
                   sidecars: bool | None = None) -> StampResult:
    """Stamp an HF directory, PEFT adapter, GGUF file/split set/directory or ONNX model in place.

    `sidecars=None` writes them for directories and for lone files that already have some beside them.
    """
    art = detect(path)
    metas = [read_file_meta(f) for f in art.files]  # validates every file before anything is written
    rec = recognise(art, metas)
    if rec.multimodal and not stamp.multimodal:  # a vision tower obliges the EU clause, whatever the caller said
        stamp = stamp.model_copy(update={"multimodal": True})
    with_sidecars = art.has_sidecars if sidecars is None else sidecars
    conflicts = _conflicts(art, metas, rec.policy, stamp, with_sidecars)
    if conflicts and not force:
        raise OutputExistsError(f"{art.path}: stamping would replace " + "; ".join(conflicts),
                                hint="pass --force to replace them with the stamp", path=art.path)
    staged = _Staged()
    try:
        for m in metas:
            tmp = staged.new(m.path)
            if m.fmt == "safetensors":
                restamp_safetensors(m.path, tmp, stamp)
            elif m.fmt == "gguf":
                restamp_gguf(m.path, tmp, stamp)
            else:
                restamp_onnx(m.path, tmp, stamp)
        for index in art.index_files:
            _restamp_index(index, staged.new(index), stamp)
        unchanged: list[Path] = []
        if with_sidecars:
            replace_card = force and _card_unreadable(art.root / "README.md")
            for filename, data in sidecar_contents(art.root, stamp, replace_card=replace_card).items():
                target = art.root / filename
                if target.is_file() and target.read_bytes() == data:
                    unchanged.append(target)
                    continue
                staged.new(target).write_bytes(data)
        written = staged.commit()
    except OSError as exc:  # disk full, read-only directory: the user's environment, not a corral bug
        staged.discard()
        raise BadInputError(f"{art.path}: cannot write the stamped files: {exc.strerror or exc}",
                            hint="nothing was changed; free space or fix permissions and run it again",
                            path=art.path) from exc
    except BaseException:
        staged.discard()
        raise
    return StampResult(art.path, art.kind, stamp.name, written, unchanged)


def _card_unreadable(path: Path) -> bool:
    return path.is_file() and read_card(path).error is not None


def _conflicts(art: Artifact, metas: list[FileMeta], recognised: Any, stamp: Stamp, with_sidecars: bool) -> list[str]:
    """What the stamp would overwrite that says something else (each needs --force)."""
    p = stamp.policy
    out: list[str] = []
    if p.recognise.architectures and recognised is not p:
        what = f"a {recognised.family} model" if recognised is not None else f"not recognised as a {p.family} model"
        out.append(f"the license of a model that is {what}")
    for m in metas:
        for key, name_key in K.LICENSE_LABEL_KEYS:
            label = m.meta.get(key)
            if label and not p.names_license(label, m.meta.get(name_key)):
                out.append(f"{m.path.name} {key}={label!r}")
        other = m.meta.get(K.POLICY)
        if other and other != p.id:
            out.append(f"{m.path.name} {K.POLICY}={other!r}")
    if with_sidecars:
        for filename in p.texts:
            f = art.root / filename
            if f.is_file() and f.read_bytes() != p.text_bytes(filename):
                out.append(f"{filename} (not the verbatim {p.display_name} text)")
        card_path = art.root / "README.md"
        if card_path.is_file():
            card = read_card(card_path)
            if card.error:
                out.append(f"README.md (its front matter cannot be parsed: {card.error})")
            elif card.data.get("license") and not p.names_license(str(card.data["license"]),
                                                                   card.data.get("license_name")):
                out.append(f"README.md license: {card.data['license']}")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Staged:
    """Temporary files beside their targets, renamed over them only when all are complete."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def new(self, target: Path) -> Path:
        tmp = new_partial(target, directory=False)  # owned by this run while it exists
        self.pairs.append((tmp, target))
        return tmp

    def commit(self) -> list[Path]:
        for tmp, target in self.pairs:
            os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, target in self.pairs:
            os.replace(tmp, target)
        for parent in {t.parent for _, t in self.pairs}:
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return [t for _, t in self.pairs]

    def discard(self) -> None:
        for tmp, _ in self.pairs:
            tmp.unlink(missing_ok=True)


# -- per format ---------------------------------------------------------------------------------------
def merged_metadata(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """Old keys kept except earlier corral stamps; the new stamp's keys win."""
    return {**{k: v for k, v in old.items() if not K.is_stamp_key(k)}, **new}


def restamp_safetensors(src: Path, dst: Path, stamp: Stamp) -> None:
    """Write `dst` = `src` with its `__metadata__` replaced; the data section is copied, never parsed."""
    from toolbox.tensors.safetensors_format import parse_header_json, read_header

    h = read_header(src)
    with open(src, "rb") as fin:
        fin.seek(8)
        doc = parse_header_json(src, fin.read(h.header_len))
        doc.pop("__metadata__", None)
        header = {"__metadata__": merged_metadata(h.metadata, stamp.safetensors_metadata()), **doc}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        with open(dst, "wb") as fout:
            fout.write(struct.pack("<Q", len(raw)) + raw)
            fout.flush()
            copy_range(fin, fout, h.data_start, h.file_size - h.data_start)


def copy_range(fin: Any, fout: Any, offset: int, length: int) -> None:
    """Copy `length` bytes from `offset` of fin to the end of fout in bounded pieces (in-kernel when possible)."""
    done = 0
    out_pos = fout.tell()
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(COPY_CHUNK, length - done),
                                       offset + done, out_pos + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # another filesystem or kernel: fall back to reads and writes
        fout.seek(out_pos + done)
    fin.seek(offset + done)
    while done < length:
        chunk = fin.read(min(COPY_CHUNK, length - done))
        if not chunk:
            raise OSError(f"{fin.name}: ended {length - done} bytes early")
        fout.write(chunk)
        done += len(chunk)


def _restamp_index(src: Path, dst: Path, stamp: Stamp) -> None:
    doc = json.loads(src.read_text(encoding="utf-8"))
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    doc["metadata"] = merged_metadata(meta, stamp.safetensors_metadata())
    dst.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def restamp_gguf(src: Path, dst: Path, stamp: Stamp) -> None:
    """Rewrite one GGUF file with the stamp's keys; tensors copied as raw bytes, piece by piece."""
    import gguf
    import numpy as np

    from toolbox.tensors.gguf.reader import GGUFFile
    from toolbox.tensors.gguf.writer import GGUFWriter

    reader = GGUFFile(src).readers[0]
    arch = reader.fields[K.GENERAL_ARCHITECTURE].contents()
    writer = GGUFWriter(dst, arch, endianess=reader.endianess, alignment=reader.alignment)
    try:
        for key, fld in reader.fields.items():
            if key.startswith("GGUF.") or key == K.GENERAL_ARCHITECTURE:
                continue
            kind = fld.types[0]
            sub = fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, fld.contents(), kind, sub_type=sub)
        apply_to_gguf_writer(writer, stamp)
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
        writer.begin_data()
        with open(src, "rb") as fin:  # plain reads, not the reader's memory map: RSS stays at one piece
            for t in reader.tensors:
                writer.write_tensor_pieces(t.name, _pieces(fin, int(t.data_offset), int(t.n_bytes)))
    finally:
        writer.close()


def _pieces(fin: Any, offset: int, length: int) -> Any:
    fin.seek(offset)
    left = length
    while left:
        chunk = fin.read(min(COPY_CHUNK, left))
        if not chunk:
            raise OSError(f"{fin.name}: ended {left} bytes early")
        left -= len(chunk)
        yield chunk


def restamp_onnx(src: Path, dst: Path, stamp: Stamp) -> None:
    """Stamp the graph file only; external data files (weights) are referenced, not rewritten."""
    import onnx

    from license.artifact import load_onnx

    model = load_onnx(src)
    apply_to_onnx(model, stamp)
    onnx.save_model(model, str(dst))
