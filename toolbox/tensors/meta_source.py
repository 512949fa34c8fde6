"""Meta's original checkpoint format (`params.json` + `consolidated.NN.pth`) as a lazy tensor source.

Each `consolidated.NN.pth` holds one model-parallel rank's part of every tensor (fairscale's
ColumnParallelLinear splits the output dim 0, RowParallelLinear the input dim 1; the routed
experts split their hidden width F; norms and the router are repeated on every rank). The pickles
are opened only with `torch.load(weights_only=True, mmap=True)`, PyTorch's restricted unpickler, so
no code runs and no tensor bytes are read until asked for; a tensor (one expert of a routed tensor)
is assembled from the ranks' parts when loaded (or only some of its rows: `load_slice` with a slice), so
memory is bounded by that slice. The parts' pages are dropped from the process once copied (see
`MetaSource._release`): torch's mapping would otherwise keep every byte read resident.

Names are presented as transformers' text model names (`model.layers.N.self_attn.q_proj.weight`,
fused experts `feed_forward.experts.gate_up_proj` [E, D, 2F] and `down_proj` [E, F, D]). Both the
names of Meta's released files (`attention.wqkv`, `experts.moe_w_in_eD_F`, `feed_forward.w_in_shared_FD`,
`mlp.fc1_weight`) and those of llama_models' module state dict (`attention.wq`, `experts.w1`,
`shared_expert.w1`) are read: llama_models' load hooks map the first onto the second, as here.

A checkpoint with a vision tower (`vision_embeddings.*`, `vision_projection.weight`) is presented as
transformers' `Llama4ForConditionalGeneration` names: the text model under `language_model.`, the encoder
under `vision_model.`, the projector as `multi_modal_projector.linear_1.weight`. The vision ranks split as
fairscale does (column-parallel weights and biases on dim 0, row-parallel weights on dim 1; row-parallel
biases, layer norms, the class and positional embeddings whole on every rank). No rotary permutation is
needed: llama_models' vision attention and transformers' both rotate interleaved pairs (complex view).
"""

from __future__ import annotations

import io
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorruptFileError, UnsupportedModelError
from toolbox.tensors.jsonio import load_json
from toolbox.tensors.source import TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

PARAMS_MAX_BYTES = 1024 * 1024
MAX_SHARDS = 64
_SHARD = re.compile(r"^consolidated(?:\.(\d{2}))?\.pth$")
_IGNORED = re.compile(r"(_extra_state|global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE"
                      r"|^rope\.freqs|^freqs?_cis)$")
_VISION = ("vision_embeddings.", "vision_projection.")
_ENC = r"vision_embeddings\.vision_encoder\."
_BLOCK = _ENC + r"transformer\.resblocks\.(\d+)\."
_LAYER = r"vision_model.model.layers.\1."
# (Meta key pattern, HF name template, how ranks combine) for the vision tower
_VISION_KEYS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple((re.compile(f"^{k}$"), v, how) for k, v, how in (
    (_ENC + r"conv1\._linear\.weight", "vision_model.patch_embedding.linear.weight", "cat0"),
    (_ENC + r"(class_embedding|positional_embedding_vlm)", r"vision_model.\1", "same"),
    (_ENC + r"ln_(pre|post)\.(weight|bias)", r"vision_model.layernorm_\1.\2", "same"),
    (_BLOCK + r"attn\.w([qkv])\.(weight|bias)", _LAYER + r"self_attn.\2_proj.\3", "cat0"),
    (_BLOCK + r"attn\.wo\.weight", _LAYER + "self_attn.o_proj.weight", "cat1"),
    (_BLOCK + r"attn\.wo\.bias", _LAYER + "self_attn.o_proj.bias", "same"),
    (_BLOCK + r"mlp\.c_fc\.(weight|bias)", _LAYER + r"mlp.fc1.\2", "cat0"),
    (_BLOCK + r"mlp\.c_proj\.weight", _LAYER + "mlp.fc2.weight", "cat1"),
    (_BLOCK + r"mlp\.c_proj\.bias", _LAYER + "mlp.fc2.bias", "same"),
    (_BLOCK + r"ln_1\.(weight|bias)", _LAYER + r"input_layernorm.\2", "same"),
    (_BLOCK + r"ln_2\.(weight|bias)", _LAYER + r"post_attention_layernorm.\2", "same"),
    (r"vision_embeddings\.vision_adapter\.mlp\.c_fc\.weight", "vision_model.vision_adapter.mlp.fc1.weight", "cat0"),
    (r"vision_embeddings\.vision_adapter\.mlp\.c_proj\.weight", "vision_model.vision_adapter.mlp.fc2.weight", "cat1"),
    (r"vision_projection\.weight", "multi_modal_projector.linear_1.weight", "cat0"),
))
_FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})

# (Meta key suffixes, HF suffix, how ranks combine): "cat0"/"cat1" concatenate along that dim,
# "same" is repeated on every rank, "T" also transposes (router_DE [D, E] -> router.weight [E, D])
_LAYER_KEYS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("attention.wo.weight",), "self_attn.o_proj.weight", "cat1"),
    (("attention.wqkv.layer_norm_weight", "attention_norm.weight"), "input_layernorm.weight", "same"),
    (("feed_forward.norm.weight", "feed_forward.mlp.layer_norm_weight", "feed_forward.mlp.layer_norm.weight",
      "ffn_norm.weight"), "post_attention_layernorm.weight", "same"),
    (("feed_forward.router_DE",), "feed_forward.router.weight", "T"),
    (("feed_forward.w_in_shared_FD.weight", "feed_forward.shared_expert.w1.weight"),
     "feed_forward.shared_expert.gate_proj.weight", "cat0"),
    (("feed_forward.w_swiglu_FD.weight", "feed_forward.shared_expert.w3.weight"),
     "feed_forward.shared_expert.up_proj.weight", "cat0"),
    (("feed_forward.w_out_shared_DF.weight", "feed_forward.shared_expert.w2.weight"),
     "feed_forward.shared_expert.down_proj.weight", "cat1"),
    (("feed_forward.w1.weight",), "feed_forward.gate_proj.weight", "cat0"),
    (("feed_forward.w3.weight",), "feed_forward.up_proj.weight", "cat0"),
    (("feed_forward.w2.weight", "feed_forward.mlp.fc2_weight"), "feed_forward.down_proj.weight", "cat1"),
)
_GLOBAL_KEYS = {"tok_embeddings.weight": ("model.embed_tokens.weight", "cat0"),
                "norm.weight": ("model.norm.weight", "same"),
                "output.weight": ("lm_head.weight", "cat0")}
_EXPERTS = {"w1": ("experts.moe_w_in_eD_F", "experts.w1"), "w3": ("experts.moe_w_swiglu_eD_F", "experts.w3"),
            "w2": ("experts.moe_w_out_eF_D", "experts.w2")}


def meta_directory(path: str | Path) -> Path | None:
    """The directory holding Meta's original format at `path` (itself, or a Hub download's `original/`)."""
    p = Path(path)
    for d in (p, p / "original"):
        if d.is_dir() and (d / "params.json").is_file() and any(_SHARD.match(f.name) for f in d.glob("consolidated*")):
            return d
    return None


def read_params(directory: Path) -> dict[str, Any]:
    """params.json (bounded; the `model` sub-object of newer releases unwrapped)."""
    params = load_json(directory / "params.json", max_bytes=PARAMS_MAX_BYTES, expect=dict)
    inner = params.get("model")
    return inner if isinstance(inner, dict) else params


def shard_paths(directory: Path) -> list[Path]:
    """consolidated.00.pth ... in rank order (or a lone consolidated.pth); a gap in the ranks is refused."""
    found = sorted((f for f in directory.iterdir() if _SHARD.match(f.name)), key=lambda f: f.name)
    if not found:
        raise CorruptFileError(f"{directory}: no consolidated.NN.pth shard", path=directory)
    if len(found) > MAX_SHARDS:
        raise CorruptFileError(f"{directory}: {len(found)} shards, more than the {MAX_SHARDS} read", path=directory)
    if len(found) > 1 or found[0].name != "consolidated.pth":
        want = [f"consolidated.{i:02d}.pth" for i in range(len(found))]
        if [f.name for f in found] != want:
            raise CorruptFileError(f"{directory}: shards {[f.name for f in found]} are not consolidated.00.pth "
                                   f"... consolidated.{len(found) - 1:02d}.pth", path=directory,
                                   hint="a model-parallel checkpoint needs every rank's file")
    return found


def _open_shard(path: Path) -> dict[str, torch.Tensor]:
    """One rank's state dict, through the restricted unpickler only (io.BytesIO extra states allowed and dropped)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"{path}: not a weights-only PyTorch checkpoint: {first}", path=path,
                               hint="corral reads .pth files only with torch.load(weights_only=True)") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: holds a {type(obj).__name__}, not a state dict", path=path)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _libc_madvise() -> Any:
    """libc's madvise(addr, length, advice), or None where there is none to call (not Linux)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _libc_madvise()
_MADV_DONTNEED = 4  # linux/mman.h
_PAGE = mmap.PAGESIZE


def _mapped_range(path: Path, shard: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The address range of `path`'s own file mapping (from /proc/self/maps) that holds all of the shard's
    tensors, or (0, 0) when they are not all inside it (nothing is then ever released)."""
    ptrs = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in shard.values()]
    ptrs = [(a, n) for a, n in ptrs if n > 0]
    if _MADVISE is None or not ptrs:
        return 0, 0
    lo, hi = min(a for a, _ in ptrs), max(a + n for a, n in ptrs)
    target = str(path.resolve())
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read(64 * 1024 * 1024).splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= lo and hi <= end:
                return start, end
    return 0, 0


@dataclass(frozen=True)
class _Plan:
    keys: tuple[str, ...]  # the Meta key in every rank (one per part)
    how: str  # cat0, cat1, same, T, qkv:q|k|v, gu (gate_up: w1 then w3), down, fc1:0|1


class MetaSource(TensorSource):
    """The tensors of a Meta-format checkpoint under transformers' names (see the module doc)."""

    row_slices = True  # load_slice(name, slice) of any tensor reads only those rows of the ranks' parts

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        self.params = read_params(self.path)
        self.files = shard_paths(self.path)
        self._shards = [_open_shard(f) for f in self.files]
        self._maps = [_mapped_range(f, s) for f, s in zip(self.files, self._shards, strict=True)]
        keys = [k for k in self._shards[0] if not _IGNORED.search(k)]
        for f, shard in zip(self.files[1:], self._shards[1:], strict=True):
            if {k for k in shard if not _IGNORED.search(k)} != set(keys):
                raise CorruptFileError(f"{f}: its tensor names differ from {self.files[0].name}'s", path=f)
        self.multimodal = any(k.startswith(_VISION) for k in keys)
        self._n_heads = int(self.params.get("n_heads") or 0)
        self._n_kv = int(self.params.get("n_kv_heads") or self._n_heads)
        if self._n_heads <= 0:
            raise CorruptFileError(f"{self.path / 'params.json'}: n_heads missing", path=self.path / "params.json")
        self._plans: dict[str, _Plan] = {}
        self._infos: dict[str, TensorInfo] = {}
        for key in keys:
            self._plan_key(key, keys)
        self._unmapped = [k for k in keys if not self._mapped(k)]
        if self._unmapped:
            raise UnsupportedModelError(f"{self.path}: tensors with no transformers name: "
                                        f"{', '.join(self._unmapped[:5])}", path=self.path)
        if self.multimodal:
            self._prefix_text()

    def _prefix_text(self) -> None:
        """Llama4ForConditionalGeneration's names: the text model under `language_model.`."""
        def hf(name: str) -> str:
            return name if name.startswith(("vision_model.", "multi_modal_projector.")) else f"language_model.{name}"

        self._plans = {hf(n): p for n, p in self._plans.items()}
        self._infos = {hf(n): TensorInfo(hf(n), i.shape, i.dtype) for n, i in self._infos.items()}

    # -- planning ----------------------------------------------------------------------------
    def _mapped(self, key: str) -> bool:
        return any(key in p.keys for p in self._plans.values())

    def _add(self, name: str, key: str, how: str) -> None:
        self._plans[name] = _Plan((key,) * len(self._shards), how)
        self._infos[name] = self._info(name)

    def _plan_key(self, key: str, keys: list[str]) -> None:
        if key.startswith(_VISION):
            for pattern, hf, how in _VISION_KEYS:
                if pattern.match(key):
                    self._add(pattern.sub(hf, key), key, how)
                    return
            return
        if key in _GLOBAL_KEYS:
            name, how = _GLOBAL_KEYS[key]
            self._add(name, key, how)
            return
        m = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if m is None:
            return
        layer, rest = f"model.layers.{m[1]}.", m[2]
        for metas, hf, how in _LAYER_KEYS:
            if rest in metas:
                self._add(layer + hf, key, how)
                return
        if rest in ("attention.wqkv.weight", "attention.wq.weight"):
            for part in ("q", "k", "v"):
                src = key if rest == "attention.wqkv.weight" else key.replace(".wq.", f".w{part}.")
                self._add(f"{layer}self_attn.{part}_proj.weight", src,
                          f"qkv:{part}" if rest == "attention.wqkv.weight" else "cat0")
        elif rest == "feed_forward.mlp.fc1_weight":
            self._add(f"{layer}feed_forward.gate_proj.weight", key, "fc1:0")
            self._add(f"{layer}feed_forward.up_proj.weight", key, "fc1:1")
        elif rest.removeprefix("feed_forward.") in _EXPERTS["w1"]:
            style = _EXPERTS["w1"].index(rest.removeprefix("feed_forward."))
            w3, w2 = (f"layers.{m[1]}.feed_forward.{_EXPERTS[w][style]}" for w in ("w3", "w2"))
            if w3 not in keys or w2 not in keys:
                raise CorruptFileError(f"{self.files[0]}: {key} without {w3} and {w2}", path=self.files[0])
            self._plans[f"{layer}feed_forward.experts.gate_up_proj"] = _Plan((key, w3), "gu")
            self._plans[f"{layer}feed_forward.experts.down_proj"] = _Plan((w2,), "down")
            for suffix in ("gate_up_proj", "down_proj"):
                name = f"{layer}feed_forward.experts.{suffix}"
                self._infos[name] = self._info(name)

    def _meta_shape(self, key: str) -> tuple[tuple[int, ...], str]:
        from toolbox.tensors.dtypes import FROM_TORCH

        shapes = {tuple(s[key].shape) for s in self._shards}
        t = self._shards[0][key]
        if len({s[key].dtype for s in self._shards}) != 1:
            raise CorruptFileError(f"{self.path}: {key} has different dtypes across shards", path=self.path)
        dtype = FROM_TORCH.get(str(t.dtype).removeprefix("torch."))
        if dtype not in _FLOAT_DTYPES:  # FP8 / int4 originals carry scales this reader does not apply yet
            raise UnsupportedModelError(f"{self.files[0]}: {key} is {t.dtype}; Meta-format checkpoints are read "
                                        "in bf16, f16 or f32 only", path=self.files[0],
                                        hint="convert the HF safetensors of the same release instead")
        if len(shapes) != 1:
            raise CorruptFileError(f"{self.path}: {key} has different shapes across shards: {sorted(shapes)}",
                                   path=self.path)
        return tuple(t.shape), dtype

    def _experts(self) -> int:
        moe = self.params.get("moe_args") or {}
        n = int(moe.get("num_experts") or 0)
        if n <= 0:
            raise CorruptFileError(f"{self.path / 'params.json'}: routed experts without moe_args.num_experts",
                                   path=self.path / "params.json")
        return n

    def _info(self, name: str) -> TensorInfo:
        plan = self._plans[name]
        shape, dtype = self._meta_shape(plan.keys[0])
        ranks = len(self._shards)
        how = plan.how
        if how in ("cat0", "cat1"):
            dim = int(how[-1])
            if len(shape) <= dim:
                raise CorruptFileError(f"{self.files[0]}: {plan.keys[0]} has shape {list(shape)}", path=self.files[0])
            shape = tuple(d * ranks if i == dim else d for i, d in enumerate(shape))
        elif how == "T":
            shape = tuple(reversed(shape))
        elif how.startswith("qkv:"):
            q, kv = self._qkv_rows(plan.keys[0], shape)
            shape = ((q if how == "qkv:q" else kv) * ranks, shape[1])
        elif how.startswith("fc1:"):
            shape = (shape[0] // 2 * ranks, shape[1])
        elif how in ("gu", "down"):
            e = self._experts()
            d = int(self.params.get("dim") or 0)
            per = shape[0] * shape[1] // e if len(shape) == 2 else shape[1] * shape[2]
            if d <= 0 or per % d:
                raise CorruptFileError(f"{self.files[0]}: {plan.keys[0]} of shape {list(shape)} does not hold "
                                       f"{e} experts of dim {d}", path=self.files[0])
            f = per // d * ranks
            shape = (e, d, 2 * f) if how == "gu" else (e, f, d)
        return TensorInfo(name, shape, dtype)

    def _qkv_rows(self, key: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows of q and of k (= v) in one rank's wqkv."""
        ranks = len(self._shards)
        heads = self._n_heads + 2 * self._n_kv
        head_dim, r = divmod(shape[0] * ranks, heads)
        if r or self._n_heads % ranks or self._n_kv % ranks:
            raise CorruptFileError(f"{self.files[0]}: {key} of shape {list(shape)} does not split into "
                                   f"{self._n_heads} + 2x{self._n_kv} heads over {ranks} ranks", path=self.files[0])
        return self._n_heads // ranks * head_dim, self._n_kv // ranks * head_dim

    # -- reading -----------------------------------------------------------------------------
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _parts(self, key: str) -> list[torch.Tensor]:
        return [s[key] for s in self._shards]

    def load(self, name: str) -> torch.Tensor:
        import torch

        if self._plans[name].how in ("gu", "down"):
            return torch.stack([self.load_slice(name, e) for e in range(self._infos[name].shape[0])])
        return self._rows(name, 0, self._infos[name].shape[0])

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        """One expert (or a range) of a routed expert tensor; rows `index` of any other tensor (only those rows
        of the ranks' parts are read, so a large embedding can be written in row blocks)."""
        import torch

        plan = self._plans[name]
        if plan.how not in ("gu", "down"):
            rows = range(self._infos[name].shape[0])[index]
            if isinstance(rows, int):
                return self._rows(name, rows, rows + 1)[0]
            return self._rows(name, rows.start, rows.stop) if rows.step == 1 else self.load(name)[index]
        e, d = self._infos[name].shape[0], int(self.params["dim"])

        def expert(key: str, down: bool) -> torch.Tensor:
            parts = self._parts(key)
            views = [p.view(e, -1, d) if down else p.view(e, d, -1) for p in parts]
            try:
                return torch.cat([v[index] for v in views], dim=-2 if down else -1)
            finally:
                self._release(parts)

        if plan.how == "down":
            return expert(plan.keys[0], True)
        return torch.cat([expert(plan.keys[0], False), expert(plan.keys[1], False)], dim=-1)

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor that is not a routed expert tensor, as a new tensor."""
        import torch

        plan = self._plans[name]
        how = plan.how
        parts = self._parts(plan.keys[0])
        try:
            if how == "same":
                return parts[0][start:stop].clone()
            if how == "T":
                return parts[0].T[start:stop].clone(memory_format=torch.contiguous_format)
            if how == "cat1":
                return torch.cat([p[start:stop] for p in parts], dim=1)
            n = parts[0].shape[0]  # rows of each rank's part taken, from `lo`
            if how.startswith("qkv:"):
                q, kv = self._qkv_rows(plan.keys[0], tuple(parts[0].shape))
                lo, n = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[how[-1]]
            elif how.startswith("fc1:"):
                n //= 2
                lo = n * int(how[-1])
            else:  # cat0
                lo = 0
            pieces = [p[lo + max(start - r * n, 0):lo + min(stop - r * n, n)] for r, p in enumerate(parts)
                      if start < (r + 1) * n and stop > r * n]
            return torch.cat(pieces, dim=0) if pieces else parts[0][lo:lo].clone()
        finally:
            self._release(parts)

    def _release(self, parts: list[torch.Tensor]) -> None:
        """Drop the pages of parts already copied from this process's view of the shard files.

        torch.load(mmap=True) maps each file privately and read-only in use; every page read stays resident in
        the process (its RSS) until unmapped, so a whole conversion would end holding every byte of the
        checkpoint. madvise(MADV_DONTNEED) on clean private file pages only unmaps them: a later read faults
        them back from the page cache. Kept inside each shard's mapped range; a no-op off Linux."""
        if _MADVISE is None:
            return
        for p, (lo, hi) in zip(parts, self._maps, strict=True):
            st = p.untyped_storage()
            a, b = st.data_ptr(), st.data_ptr() + st.nbytes()
            a, b = max(a - a % _PAGE, lo), min(b + (-b) % _PAGE, hi)
            if a < b:
                _MADVISE(a, b - a, _MADV_DONTNEED)

    def close(self) -> None:
        self._shards = []
