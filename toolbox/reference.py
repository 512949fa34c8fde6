"""What a user names as a model (a path, `demo:scout`), resolved once at the edge.

Commands and library entry points turn their argument into a `ResolvedModel` here; everything
below them (converters, writers, the tensor floor) receives that, or the plain path it holds,
and never resolves again. The checkpoint config is read at most once per resolved model.

A Hub `repo_id@revision` reference belongs here too, when it comes: a new kind of reference is one
more branch in `ModelReference.parse` and `resolve`. Meta's original format (`params.json` +
`consolidated.NN.pth`, or a download's `original/` folder) resolves like an HF directory: its
`checkpoint` is derived from params.json and `open_source()` reads the shards (`toolbox.tensors.meta_source`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from toolbox.errors import BadInputError, CorralError
from toolbox.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    from collections.abc import Callable

    from license.stamp import StampInput
    from toolbox.checkpoint import Llama4Checkpoint
    from toolbox.tensors.source import TensorSource

DEMO_PREFIX = "demo:"
Kind = Literal["path", "demo"]
# The Hub's repo-id grammar (huggingface_hub.utils.validate_repo_id), namespace required: `owner/name`, each
# 1-96 of [A-Za-z0-9_.-] starting and ending with a letter, digit or underscore, no `--` or `..`.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
# names that end like a file corral reads or writes are files, never repositories
FILE_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".json", ".yaml", ".yml", ".bin", ".pth", ".pt", ".data", ".dat",
                 ".txt", ".model", ".pem", ".sig")


def is_hub_id(spec: object) -> bool:
    """True for a string in the Hub's `owner/name` grammar that is not an existing local path. Anything
    path-shaped is a path: a `Path` object, a name starting with `.`, `/` or `~`, with more than one `/`,
    with `--`, `..` or a `.git` end, or ending in a file suffix (`.safetensors`, `.gguf`, `.onnx`, ...)."""
    if not isinstance(spec, str) or not HUB_ID.fullmatch(spec):
        return False
    if "--" in spec or ".." in spec or spec.lower().endswith((".git", *FILE_SUFFIXES)):
        return False
    return not Path(spec).exists()


@dataclass(frozen=True)
class ModelReference:
    """A model as the user named it, not yet resolved (nothing is read or generated)."""

    text: str
    kind: Kind

    @classmethod
    def parse(cls, spec: str | Path | ModelReference) -> ModelReference:
        if isinstance(spec, ModelReference):
            return spec
        text = str(spec)
        return cls(text, "demo" if text.startswith(DEMO_PREFIX) else "path")

    @property
    def label(self) -> str:
        """How provenance names the input: `demo:scout`, else the file or directory name."""
        return self.text if self.kind == "demo" else (Path(self.text).name or self.text)

    def resolve(self, progress: Progress = NULL_PROGRESS) -> ResolvedModel:
        """A demo is generated into the cache on first use; a path passes through."""
        if self.kind == "demo":
            from toolbox.demo import resolve_checkpoint

            return ResolvedModel(self, resolve_checkpoint(self.text, progress=progress))
        return ResolvedModel(self, Path(self.text))


@dataclass
class ResolvedModel:
    """A reference with its local path; the HF config is read on first use and kept."""

    reference: ModelReference
    path: Path
    _checkpoint: Llama4Checkpoint | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.reference.label

    @property
    def meta_dir(self) -> Path | None:
        """The directory of Meta's original format (`params.json` + `consolidated.NN.pth`) when this model is in
        it: the path itself, or the `original/` folder of a download that holds no HF checkpoint."""
        from toolbox.tensors.meta_source import meta_directory

        p = self.path
        if not p.is_dir() or (p / "config.json").is_file() or any(p.glob("*.safetensors")):
            return None
        return meta_directory(p)

    @property
    def checkpoint(self) -> Llama4Checkpoint:
        """The HF checkpoint's understood config (read once; for Meta's format, derived from params.json)."""
        if self._checkpoint is None:
            meta = self.meta_dir
            if meta is not None:
                self._checkpoint = _meta_checkpoint(meta)
            else:
                from toolbox.checkpoint import load_checkpoint as load_path

                self._checkpoint = load_path(self.path)
        return self._checkpoint

    @property
    def directory(self) -> Path:
        """The checkpoint directory (the parent of a lone .safetensors file)."""
        return self.path if self.path.is_dir() else self.path.parent

    def stamp_input(self, source: TensorSource | None = None, *, carried_name: str | None = None) -> StampInput:
        """What an output made from this model inherits: its label, a download manifest's origin, and
        (from `source`'s metadata) the stamp corral wrote on it, with that stamp's history."""
        from license.stamp import StampInput
        from toolbox.hub.manifest import source_origin

        family = self._checkpoint.family if self._checkpoint is not None else ""
        return StampInput(self.label, origin=source_origin(self.directory),
                          prior=dict(source.metadata) if source is not None else {},
                          carried_name=carried_name, family=family)

    def _config(self) -> dict | None:
        """config.json, when there is one to read (a lone .safetensors file may have none)."""
        try:
            return self.checkpoint.config
        except CorralError:
            return None

    def open_source(self, *, canonical: bool = True) -> TensorSource:
        """The tensors of an HF checkpoint. `canonical` presents per-expert and FP8 layouts as the
        fused bf16 layout transformers uses (see `toolbox.tensors.canonical`)."""
        from toolbox.tensors.safetensors_source import SafetensorsSource

        meta = self.meta_dir
        if meta is not None:
            from toolbox.tensors.meta_source import MetaSource

            return MetaSource(meta)  # already in the canonical fused layout
        source: TensorSource = SafetensorsSource(self.path)
        if canonical:
            from toolbox.tensors.canonical import hf_view

            source = hf_view(source, self._config())
        return source


@dataclass
class DerivedModel(ResolvedModel):
    """A model that exists only as a tensor source over another one (a merge or a prune streamed into a
    converter, with no copy on disk): `path` is a small directory with its config.json and tokenizer files,
    `tensors` opens its tensors (already canonical; their metadata is the stamp the model would carry, so an
    output inherits its history). The reference is the input the chain started from: provenance names it."""

    tensors: Callable[[], TensorSource] | None = field(default=None, repr=False)

    def open_source(self, *, canonical: bool = True) -> TensorSource:
        assert self.tensors is not None
        return self.tensors()


ModelLike = str | Path | ModelReference | ResolvedModel


def _meta_checkpoint(meta: Path) -> Llama4Checkpoint:
    """The checkpoint of Meta's format: its config derived from params.json and the shards, whose `path` is a
    cached directory holding that config.json and the tokenizer files (see `toolbox.meta_config`)."""
    from toolbox.checkpoint import from_config, read_config
    from toolbox.demo import cache_dir
    from toolbox.meta_config import sidecar_directory
    from toolbox.tensors.meta_source import MetaSource

    source = MetaSource(meta)
    try:
        side = sidecar_directory(meta, source.infos(), source.params, cache_dir())
    finally:
        source.close()
    return from_config(read_config(side), side)


def resolve(spec: ModelLike, progress: Progress = NULL_PROGRESS) -> ResolvedModel:
    """The one resolution step: a ResolvedModel passes through unchanged (no second read)."""
    if isinstance(spec, ResolvedModel):
        return spec
    return ModelReference.parse(spec).resolve(progress)


def resolve_path(spec: ModelLike, progress: Progress = NULL_PROGRESS) -> Path:
    return resolve(spec, progress).path


def load_checkpoint(spec: ModelLike) -> Llama4Checkpoint:
    """The config of a checkpoint directory, a .safetensors file or `demo:*`."""
    model = resolve(spec)
    if not model.path.exists():
        raise BadInputError(f"{model.path}: no such file or directory", path=model.path)
    return model.checkpoint


def open_source(spec: ModelLike, *, canonical: bool = True) -> TensorSource:
    """Open any checkpoint corral reads (see `ResolvedModel.open_source`)."""
    return resolve(spec).open_source(canonical=canonical)
