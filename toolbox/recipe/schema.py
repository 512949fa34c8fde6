"""The recipe file format (`corral: 1`), as pydantic models; `corral recipe schema` exports it.

A recipe names one source checkpoint and a list of steps. Each step `uses` one operation, reads
the output of the source or of an earlier step (`from`), takes the operation's parameters under
`with`, may fan out over a `matrix` of values (`{name}` placeholders in `with` strings and in
`output`), and may publish its result under `output` in the output directory. `verify` and
`license-check` steps are gates: a finding fails the run.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
STEP_ID = r"^[a-z][a-z0-9_-]{0,62}$"
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


IMPLICIT_PLACEHOLDERS = ("model",)  # {model}: the source's model name (a demo name for demo: sources)


class FieldError(ValueError):
    """A validation error that knows which field (below the model that raised it) is wrong."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc = loc


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class LicenseSpec(_Strict):
    """The declarations every output is stamped with (see `corral license --help`)."""

    mau_declaration: str | None = Field(None, description="below-700m or meta-license:REFERENCE; default: "
                                        "$CORRAL_MAU_DECLARATION")
    fix_name: bool = Field(False, description="Prefix output names with 'Llama-4-' where needed")


class Adapter(_Strict):
    path: str = Field(description="PEFT adapter directory")
    weight: float = 1.0


class GGUFQuantWith(_Strict):
    """llama-quantize's per-tensor options of a GGUF output with a mix outtype (corral convert --help): a convert
    step's, and a merge/prune/extract step's with `to: gguf` (the same keys, checked the same way)."""

    tensor_types: list[Annotated[str, Field(max_length=300)]] = Field(
        [], max_length=64, description="REGEX=TYPE overrides, first match wins (--tensor-type)")
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    imatrix: str | None = Field(None, description="importance matrix file (llama-imatrix's GGUF or legacy .dat), "
                                "or the id of an earlier `uses: imatrix` step")
    include_weights: list[Annotated[str, Field(max_length=300)]] = Field([], max_length=64)
    exclude_weights: list[Annotated[str, Field(max_length=300)]] = Field([], max_length=64)

    def _quant_needs_gguf(self, to: str) -> None:
        """A chain step's per-tensor options are refused without `to: gguf` (they would be ignored)."""
        given = [k for k in GGUFQuantWith.model_fields if getattr(self, k)]
        if given and to != "gguf":
            raise FieldError(f"{given[0]} is a GGUF option: it needs to: gguf", given[0])


class ConvertWith(GGUFQuantWith):
    to: Literal["gguf", "hf", "onnx"]
    outtype: str = Field("auto", description="GGUF tensor type (q8_0, q4_k_m, bf16, ...)")
    dtype: str = Field("auto", description="HF/ONNX dtype")
    split_max_size: str | None = None
    name: str | None = Field(None, description="Model name (must begin with 'Llama')")
    allow_lossy_config: bool = False
    opset: int | None = Field(None, ge=18, le=23, description="ONNX opset (default 18)")
    kv_cache: bool = Field(True, description="ONNX past/present KV inputs and outputs")
    mmproj: Literal["auto", "none"] | None = Field(None, description="to gguf: auto also writes the vision tower "
                                                   "as OUT.mmproj.gguf, published beside the output")
    mmproj_outtype: Literal["auto", "f32", "f16", "bf16", "q8_0"] | None = None


def _shard_size(value: str | None) -> str | None:
    """A shard_size is a size of at least 1 MB (refused at load, with its line), unless a matrix fills it in."""
    if value is not None and "{" not in value:
        from toolbox.tensors.sink import MIN_SPLIT_BYTES, parse_size

        if parse_size(value, minimum=MIN_SPLIT_BYTES) == 0:  # InvalidSizeError is a ValueError too
            raise ValueError("shard_size 0: give a size such as 2G, or leave it out for 5GiB")
    return value


ShardSize = Annotated[str | None, AfterValidator(_shard_size)]


class MergeModel(_Strict):
    path: str = Field(description="Fine-tuned HF checkpoint directory (a weight merge's input)")
    weight: float = 1.0
    density: float | None = Field(None, ge=0, le=1, description="ties/dare: share of the delta kept")


class MergeWith(GGUFQuantWith):
    adapters: list[Adapter] = Field([], description="LoRA adapters (without method)")
    method: Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp",
                    "model_stock"] | None = Field(None, description="a weight merge of full fine-tunes of the "
                                                  "step's input (the base) with `models`")
    models: list[MergeModel] = []
    normalize: bool | None = None
    seed: int = Field(0, ge=0, lt=1 << 63, description="DARE's mask seed")
    t: float | None = Field(None, ge=0, le=1, description="slerp: 0 is the base")
    dtype: str | None = None
    name: str | None = None
    to: Literal["hf", "gguf"] = Field("hf", description="gguf: the LoRA merge streamed straight into a GGUF file "
                                      "(no merged HF copy on disk)")
    outtype: str = Field("auto", max_length=40, description="GGUF tensor type with to: gguf (q8_0, q4_k_m, ...)")
    shard_size: ShardSize = Field(None, max_length=40, description="largest safetensors file of the HF output "
                                  "(e.g. 2G, 500M; default 5GiB); on a Ray cluster each file is one task")

    @model_validator(mode="after")
    def _adapters_or_models(self) -> MergeWith:
        if self.method is None and not self.adapters:
            raise ValueError("give adapters (a LoRA merge), or method and models (a weight merge)")
        if self.method is not None and (self.adapters or not self.models):
            raise ValueError("a weight merge (method) takes models, not adapters")
        if self.method is not None and self.to != "hf":
            raise ValueError("a weight merge writes an HF checkpoint: convert it in a next step")
        if self.shard_size is not None and self.to != "hf":
            raise ValueError("shard_size sizes a merge's HF output (to: hf)")
        self._quant_needs_gguf(self.to)
        return self


MAX_INDEX = 1 << 16  # experts and layers: Maverick has 128 experts and 48 layers
Layer = Annotated[int, Field(ge=0, le=MAX_INDEX)]
Experts = Annotated[list[Layer], Field(max_length=MAX_INDEX)]


class PruneWith(GGUFQuantWith):
    keep: Experts | dict[Layer, Experts] | None = Field(None, description="experts to keep in every MoE layer, "
                                                        "or {layer: [experts]}")
    drop: Experts | dict[Layer, Experts] | None = None
    keep_count: int | None = Field(None, ge=1, le=MAX_INDEX)
    criterion: Literal["frequency", "reap", "ean"] | None = None
    calibration: str | None = None
    name: str | None = None
    to: Literal["hf", "gguf"] = Field("hf", description="gguf: the pruned model streamed straight into a GGUF "
                                      "file (no pruned HF copy on disk)")
    outtype: str = Field("auto", max_length=40, description="GGUF tensor type with to: gguf (q8_0, q4_k_m, ...)")
    shard_size: ShardSize = Field(None, max_length=40, description="largest safetensors file of the HF output "
                                  "(e.g. 2G, 500M; default 5GiB); on a Ray cluster each file is one task")

    @model_validator(mode="after")
    def _one_selection(self) -> PruneWith:
        given = [k for k in ("keep", "drop", "keep_count") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of keep, drop, keep_count")
        if self.keep_count is not None and (self.criterion is None or self.calibration is None):
            raise ValueError("keep_count needs criterion and calibration")
        if self.shard_size is not None and self.to != "hf":
            raise ValueError("shard_size sizes an HF output (to: hf)")
        self._quant_needs_gguf(self.to)
        return self


class ExtractWith(GGUFQuantWith):
    expert: Annotated[int, Field(ge=0, le=MAX_INDEX)] | Literal["auto"]
    calibration: str | None = None
    name: str | None = None
    to: Literal["hf", "gguf"] = Field("hf", description="gguf: the dense model streamed straight into a GGUF "
                                      "file (no dense HF copy on disk)")
    outtype: str = Field("auto", max_length=40, description="GGUF tensor type with to: gguf (q8_0, q4_k_m, ...)")
    shard_size: ShardSize = Field(None, max_length=40, description="largest safetensors file of the HF output "
                                  "(e.g. 2G, 500M; default 5GiB); on a Ray cluster each file is one task")

    @model_validator(mode="after")
    def _gguf_options(self) -> ExtractWith:
        self._quant_needs_gguf(self.to)
        return self


class ExtractLoraWith(_Strict):
    base: str = Field(description="the base checkpoint the step's input was fine-tuned from: a path or demo:*")
    rank: int = Field(ge=1, le=1 << 16)
    rank_pattern: dict[Annotated[str, Field(min_length=1, max_length=1024)], Annotated[int, Field(ge=1, le=1 << 16)]] \
        = Field({}, max_length=4096, description="REGEX: rank, PEFT's rank_pattern rule (RE2)")
    targets: list[Literal["attention", "shared_expert", "dense_mlp", "experts"]] | None = None
    alpha: float | None = Field(None, gt=0, le=1e9, description="lora_alpha (default: the rank, scaling 1)")
    dtype: Literal["f32", "bf16", "f16"] = "f32"
    svd: Literal["auto", "full", "randomized"] = "auto"
    name: str | None = None


class VerifyWith(_Strict):
    deep: bool = False
    against: str | None = Field(None, description="'source' or a step id: compare tensors with that checkpoint")


class LicenseCheckWith(_Strict):
    pass


class SignWith(_Strict):
    key: str = Field(description="ECDSA private key (PEM), relative to the recipe; its content is part of the key")
    password_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]{0,63}$",
                                     description="environment variable holding the key's password")


class BomWith(_Strict):
    format: Literal["cyclonedx", "spdx", "spdx3"] = Field(
        "cyclonedx", description="written inside the artifact as bom.cdx.json / bom.spdx.json / bom.spdx3.json "
        "(FILE.cdx.json beside a lone file)")


class PublishWith(_Strict):
    repo_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$",
                         description="Hub repository ORG/NAME (HF_ENDPOINT, HF_TOKEN apply)")
    revision: str | None = Field(None, max_length=200, description="branch (default main)")
    private: bool = False
    create_pr: bool = False
    commit_message: str | None = Field(None, max_length=1000)
    public_key: str | None = Field(None, description="verify the signature with this public key first")


class _Step(_Strict):
    id: Annotated[str, Field(pattern=STEP_ID)]
    from_: str = Field("source", alias="from", description="'source' or the id of an earlier step")
    matrix: dict[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")], list[str | int | float]] = {}
    output: str | None = Field(None, description="Publish the result under this name in the output directory")

    @field_validator("matrix")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"matrix.{key} is empty")
            if len(set(map(str, values))) != len(values):
                raise ValueError(f"matrix.{key} repeats a value")
        return v

    @model_validator(mode="after")
    def _placeholders(self) -> _Step:
        known = {*self.matrix, *IMPLICIT_PLACEHOLDERS}
        for text in [self.output or "", *_strings(getattr(self, "with_", None))]:
            unknown = set(_PLACEHOLDER.findall(text)) - known
            if unknown:
                raise FieldError(f"placeholder {{{sorted(unknown)[0]}}} is not a matrix key of this step",
                                 "output" if text == self.output else "with")
        if len(self.matrix) and self.output and not set(self.matrix) <= set(_PLACEHOLDER.findall(self.output)):
            raise FieldError("with a matrix, output must name every matrix key (e.g. {outtype}) so that "
                             "fanned-out outputs do not collide", "output")
        if self.output is not None and (self.output.startswith(("/", "~")) or ".." in self.output.split("/")):
            raise FieldError("output must be a relative name inside the output directory", "output")
        return self


def _strings(model: BaseModel | None) -> list[str]:
    if model is None:
        return []
    out: list[str] = []
    for value in model.model_dump().values():
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(str(v.get("path", "")) if isinstance(v, dict) else str(v) for v in value)
    return out


class ConvertStep(_Step):
    uses: Literal["convert"]
    with_: ConvertWith = Field(alias="with")


class MergeStep(_Step):
    uses: Literal["merge"]
    with_: MergeWith = Field(alias="with")


class PruneStep(_Step):
    uses: Literal["prune"]
    with_: PruneWith = Field(alias="with")


class ExtractStep(_Step):
    uses: Literal["extract"]
    with_: ExtractWith = Field(alias="with")


class ExtractLoraStep(_Step):
    uses: Literal["extract-lora"]
    with_: ExtractLoraWith = Field(alias="with")


class VerifyStep(_Step):
    uses: Literal["verify"]
    with_: VerifyWith = Field(VerifyWith(), alias="with")


class LicenseCheckStep(_Step):
    uses: Literal["license-check"]
    with_: LicenseCheckWith = Field(LicenseCheckWith(), alias="with")


class SignStep(_Step):
    uses: Literal["sign"]
    with_: SignWith = Field(alias="with")


class BomStep(_Step):
    uses: Literal["bom"]
    with_: BomWith = Field(BomWith(), alias="with")


class PublishStep(_Step):
    uses: Literal["publish"]
    with_: PublishWith = Field(alias="with")


class ReportWith(_Strict):
    title: str | None = Field(None, max_length=200, description="how the page names the artifact (default: its "
                              "file name); {model} and matrix placeholders apply")
    against: str | None = Field(None, description="'source' or a step id: a GGUF input's per-tensor error "
                                "against that checkpoint (verify --against)")


class ReportStep(_Step):
    uses: Literal["report"]
    with_: ReportWith = Field(ReportWith(), alias="with")


class ImatrixWith(_Strict):
    """`corral imatrix` of the step's input (an HF checkpoint): imatrix.gguf, for a convert step's `imatrix`."""

    calibration: str = Field(description="calibration text (.txt, .jsonl), relative to the recipe")
    chunk: int = Field(512, ge=16, le=8192, description="tokens per chunk (llama-imatrix -c)")
    chunks: int | None = Field(None, ge=1, le=1 << 20, description="at most this many chunks")
    all_experts: bool = Field(False, description="statistics for every routed expert on every token")
    name: str | None = None


class ImatrixStep(_Step):
    uses: Literal["imatrix"]
    with_: ImatrixWith = Field(alias="with")


class EvalWith(_Strict):
    """`corral eval` of the step's input (a GGUF): eval.json, the step's artifact; a threshold fails the step."""

    calibration: str = Field(description="held-out text (.txt, .jsonl), relative to the recipe")
    against: str = Field("source", description="'source' or a step id: the reference (an HF checkpoint, or a "
                         "BF16/F32 GGUF run in llama.cpp)")
    ctx: int = Field(512, ge=16, le=4096, description="tokens per chunk")
    chunks: int = Field(8, ge=1, le=256)
    max_kl: float | None = Field(None, ge=0, description="fail (exit 1) when the mean KL divergence is above this")
    min_top1: float | None = Field(None, ge=0, le=1, description="fail (exit 1) when top-1 agreement is below this")


class EvalStep(_Step):
    uses: Literal["eval"]
    with_: EvalWith = Field(alias="with")


Step = Annotated[ConvertStep | MergeStep | PruneStep | ExtractStep | ExtractLoraStep | VerifyStep | LicenseCheckStep
                 | SignStep | BomStep | PublishStep | ReportStep | ImatrixStep | EvalStep, Field(discriminator="uses")]
GATES = ("verify", "license-check", "publish")  # publish also runs only after every other gate passed


class Recipe(_Strict):
    """A reproducible pipeline: source -> steps -> published outputs, with gates."""

    corral: Literal[1] = Field(description="Recipe format version")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
    description: str = ""
    source: str = Field(description="Hub repo id, local path, or demo:scout / demo:maverick")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a Hub source")
    include: list[str] = Field([], description="Hub source: only files matching these globs")
    license: LicenseSpec = LicenseSpec()
    executor: Literal["local", "ray"] | None = Field(None, description="Where steps run: local threads (default) "
                                                     "or a Ray cluster; --executor and $CORRAL_EXECUTOR win")
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph(self) -> Recipe:
        seen: dict[str, Any] = {}
        for i, step in enumerate(self.steps):
            if step.id in seen or step.id == "source":
                raise FieldError(f"step id {step.id!r} is used twice" if step.id in seen else "'source' is reserved",
                                 "steps", i, "id")
            if step.from_ != "source" and step.from_ not in seen:
                raise FieldError(f"step {step.id!r} reads from {step.from_!r}, which is not an earlier step",
                                 "steps", i, "from")
            if step.from_ != "source" and seen[step.from_].uses in GATES:
                raise FieldError(f"step {step.id!r} reads from gate {step.from_!r}, which produces nothing",
                                 "steps", i, "from")
            if step.uses != "publish" and any(s.uses == "publish" for s in seen.values()):
                raise FieldError(f"step {step.id!r} comes after a publish step: publish comes last", "steps", i)
            if step.uses in GATES and step.output:
                raise FieldError(f"gate {step.id!r} produces nothing to publish: remove output", "steps", i, "output")
            against = getattr(step.with_, "against", None)
            if against is not None and against != "source" and against not in seen:
                raise FieldError(f"step {step.id!r}: against {against!r} is not 'source' or an earlier step",
                                 "steps", i, "with", "against")
            imatrix = getattr(step.with_, "imatrix", None)
            if imatrix is not None and re.fullmatch(STEP_ID, imatrix) and getattr(seen.get(imatrix), "uses",
                                                                                  "imatrix") != "imatrix":
                raise FieldError(f"step {step.id!r}: imatrix {imatrix!r} is a {seen[imatrix].uses} step, not an "
                                 "imatrix step", "steps", i, "with", "imatrix")
            seen[step.id] = step
        outputs: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            if step.output and not step.matrix:
                if step.output in outputs:
                    raise FieldError(f"steps {outputs[step.output]} and {i} publish the same output name",
                                     "steps", i, "output")
                outputs[step.output] = i
        return self

    def step(self, step_id: str) -> Any:
        return next(s for s in self.steps if s.id == step_id)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of recipe files, for editors (yaml-language-server) and CI linters."""
    schema = Recipe.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "corral recipe"
    return schema
