"""A GGUF file or a corral ONNX export seen as an HF checkpoint, tensor by tensor, with nothing on disk.

GGUF -> ONNX and ONNX -> GGUF feed these views to the HF exporters (`onnx_export`, `hf_to_gguf`) as a
`toolbox.reference.DerivedModel`, a resolved model whose tensors come from the view instead of shards:
- `GGUFAsHF`: transformers' names and layouts from converters/gguf_to_hf.py's maps (gate/up re-fused,
  experts transposed back), dequantized to float32 (BF16 stays BF16) per tensor, per expert or per
  block of rows, so memory stays one slice as with any source;
- `OnnxAsHF`: the initializers of a float export (their names are the PyTorch parameter names, mapped
  by converters/onnx_to_hf.py), read from `model.onnx.data` by byte range, row block by row block.
A view's metadata is the stamp the step to HF would have written (as an HF copy's shards would carry
it), so the output's provenance is that of the two conversions, and it is named after the input file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorruptFileError
from toolbox.reference import DerivedModel, ModelReference
from toolbox.tensors.source import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

    from toolbox.checkpoint import Llama4Checkpoint


class _StampedSource(TensorSource):
    """A view whose metadata is the stamp the HF step it stands for would have written."""

    stamp_meta: dict[str, str]

    @property
    def metadata(self) -> dict[str, str]:
        return self.stamp_meta


# -- GGUF ------------------------------------------------------------------------------------------------

class GGUFAsHF(_StampedSource):
    """The text model of a llama4 GGUF under transformers' Llama4ForCausalLM names."""

    def __init__(self, g: Any, ckpt: Llama4Checkpoint, stamp_meta: dict[str, str]) -> None:
        from converters.gguf_to_hf import gguf_sources, global_names

        self.g, self.path, self.stamp_meta = g, g.path, stamp_meta
        self._map = global_names(ckpt)
        self._sources: dict[str, list[str]] = {}
        self._infos: dict[str, TensorInfo] = {}
        for name, shape in ckpt.expected_tensors().items():
            srcs = gguf_sources(name, self._map)
            missing = [s for s in srcs if s not in g.tensors]
            if missing:
                raise CorruptFileError(f"{g.path}: no tensor {missing[0]} (for {name})", path=g.path)
            bf16 = all(g.type_name(s) == "BF16" for s in srcs)  # GGUFFile.load keeps BF16, dequantizes to F32
            self._sources[name] = srcs
            self._infos[name] = TensorInfo(name, tuple(shape), "BF16" if bf16 else "F32")

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self.load_slice(name, slice(None))

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        import torch

        from converters.gguf_to_hf import hf_expert, is_expert_tensor

        info = self._infos[name]
        srcs = self._sources[name]
        if is_expert_tensor(name):
            if isinstance(index, int):
                return hf_expert(self.g, name, srcs, index)
            return torch.stack([hf_expert(self.g, name, srcs, e) for e in range(info.shape[0])[index]])
        if len(info.shape) < 2 or (isinstance(index, slice) and index == slice(None)):
            return self.g.load(srcs[0]).reshape(info.shape)[index]
        return self._rows(srcs[0], info.shape, index)

    def _rows(self, gname: str, shape: tuple[int, ...], index: int | slice) -> torch.Tensor:
        """Rows of a 2-D tensor, decoding only their blocks (GGUF rows are the HF rows for 2-D weights)."""
        from toolbox.tensors.gguf.quant import decode

        t = self.g.tensors[gname]
        rows = range(shape[0])[index]
        if isinstance(rows, int):
            return decode(t.data[rows], t.tensor_type.name, tuple(shape[1:]))
        if rows.step != 1:
            return self.g.load(gname).reshape(shape)[index]
        return decode(t.data[rows.start:rows.stop], t.tensor_type.name, (len(rows), *shape[1:]))


def gguf_model(src: str | Path, side: Path, opts: Any) -> DerivedModel:
    """A GGUF as an HF model; its config.json and tokenizer files are written into `side` (small files)."""
    import json

    from converters.gguf_to_hf import hf_config_for, hf_stamp, output_dtype
    from converters.gguf_tokenizer import write_hf_tokenizer
    from toolbox.checkpoint import load_checkpoint
    from toolbox.errors import UnsupportedModelError
    from toolbox.tensors.dtypes import TORCH_NAME
    from toolbox.tensors.gguf.reader import GGUFFile

    g = GGUFFile(src)
    if g.architecture != "llama4":
        raise UnsupportedModelError(f"{g.path}: GGUF architecture {g.architecture!r} is not llama4", path=g.path)
    config = hf_config_for(g)
    _, lossy = output_dtype(g, "f32")  # the view dequantizes to f32: only the GGUF's own quantization is lost
    config["dtype"] = TORCH_NAME["F32"]
    (side / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_hf_tokenizer(g, side)
    ckpt = load_checkpoint(side)
    meta = hf_stamp(g, src, lossy, opts).safetensors_metadata()
    return DerivedModel(ModelReference.parse(str(src)), side, ckpt, tensors=lambda: GGUFAsHF(g, ckpt, meta))


# -- ONNX ------------------------------------------------------------------------------------------------

class OnnxAsHF(_StampedSource):
    """The weights of a corral float ONNX export, read by byte range from its external data."""

    def __init__(self, path: Path, tensors: list[Any], stamp_meta: dict[str, str]) -> None:
        self.path, self.stamp_meta = path, stamp_meta
        self._tensors = {t.name: t for t in tensors}
        self._infos = {t.name: TensorInfo(t.name, t.shape, t.dtype) for t in tensors}
        self._handles: dict[Path, int] = {}  # opened on first read, closed by close()
        self._lock = threading.Lock()

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self.load_slice(name, slice(None))

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        import torch

        from toolbox.tensors.dtypes import TORCH_NAME

        t = self._tensors[name]
        dtype = getattr(torch, TORCH_NAME[t.dtype])
        if not t.shape:
            return torch.frombuffer(self._read(t, 0, t.length), dtype=dtype).reshape(())
        rows = range(t.shape[0])[index]
        if isinstance(rows, range) and rows.step != 1:
            return self.load(name)[index]
        row_bytes = t.length // t.shape[0] if t.shape[0] else 0
        first, count = (rows, 1) if isinstance(rows, int) else (rows.start, len(rows))
        data = self._read(t, first * row_bytes, count * row_bytes)
        shape = tuple(t.shape[1:]) if isinstance(rows, int) else (count, *t.shape[1:])
        return (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(shape)

    def _read(self, t: Any, start: int, length: int) -> bytearray:
        """`length` bytes of `t` from `start` (within its checked byte range); positional reads, so the
        exporters' reader threads may share the file."""
        import os

        with self._lock:
            fd = self._handles.get(t.file)
            if fd is None:
                fd = self._handles[t.file] = os.open(t.file, os.O_RDONLY)
        data = bytearray(length)
        view, done = memoryview(data), 0
        while done < length:
            n = os.preadv(fd, [view[done:]], t.offset + start + done)
            if n <= 0:
                raise CorruptFileError(f"{t.file}: ends inside {t.name}", path=t.file)
            done += n
        return data

    def close(self) -> None:
        import os

        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


def onnx_model(src: str | Path, opts: Any) -> DerivedModel:
    """A corral float ONNX export as an HF model; its own directory holds config.json and the tokenizer."""
    from converters.onnx_to_hf import hf_config, hf_stamp, model_path, read_tensors
    from toolbox.checkpoint import from_config

    path = model_path(src)
    proto, tensors = read_tensors(path)  # refuses int4/int8 and foreign exports
    ckpt = from_config(hf_config(path, tensors), path.parent)
    meta = hf_stamp(path, proto, opts).safetensors_metadata()
    return DerivedModel(ModelReference.parse(str(path.parent)), path.parent, ckpt,
                        tensors=lambda: OnnxAsHF(path, tensors, meta))
