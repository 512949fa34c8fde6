"""`MODEL+LORA` inputs of a weight merge (mergekit's reference syntax): the PEFT adapter is merged into that
input piece by piece as it is read, checked against PEFT's merge_and_unload and then mergekit's method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_merge import ATTN, EXPERTS, make_adapter, peft_merged

from license.stamp import LicenseOptions
from toolbox.errors import BadInputError, UsageError
from toolbox.merge.weights import merge_weights

OPTS = LicenseOptions(mau_declaration="below-700m")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, scout_dir: Path) -> Path:
    return make_adapter(scout_dir, tmp_path_factory.mktemp("lora") / "scout-lora", r=4, lora_alpha=8,
                        target_modules=ATTN, target_parameters=EXPERTS)


def _read(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


@pytest.mark.slow
def test_model_plus_lora_is_peft_merge_then_mergekit(scout_dir: Path, lora: Path, tmp_path: Path) -> None:
    """linear of `demo+LORA` alone is PEFT's float32 merge rounded once to the demo's bf16, exactly; task
    arithmetic of BASE with `BASE+LORA` equals mergekit's on those PEFT-merged tensors; the adapter's files
    are hashed into the provenance."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    spec = f"{scout_dir}+{lora}"
    merge_weights(scout_dir, [spec], tmp_path / "lin", method="linear", license_options=OPTS)
    merge_weights(scout_dir, [spec], tmp_path / "ta", method="task_arithmetic", weights=[0.7], dtype="f32",
                  license_options=OPTS)
    peft = {k: v.to(torch.bfloat16) for k, v in peft_merged(scout_dir, lora).items()}
    base, lin, ta = _read(scout_dir), _read(tmp_path / "lin"), _read(tmp_path / "ta")
    assert set(lin) == set(peft) == set(ta)
    assert sum(not torch.equal(peft[k], base[k]) for k in peft) >= 8  # the adapter changed attention and experts
    fn = registry.get("task_arithmetic")
    for k, want in peft.items():
        assert torch.equal(lin[k], want), k
        group = TensorGroup.from_tensors([base[k].float(), want.float()], base_index=0, name=k)
        ref = fn([group], parameters={"weight": [0.7]}, dtype=torch.float32)[0]
        torch.testing.assert_close(ta[k], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    meta = safe_open(str(next((tmp_path / "ta").glob("*.safetensors"))), "pt").metadata()
    assert "/lora/adapter_config.json" in meta["corral.provenance"]
    cfg = tmp_path / "merge.yaml"  # the same input in mergekit's YAML, through the CLI
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {scout_dir}\nmodels:\n  - model: {spec}\n"
                   "    parameters: {weight: 0.7}\ndtype: float32\n")
    from toolbox.cli.main import main

    assert main(["merge", "--config", str(cfg), "-o", str(tmp_path / "yaml"), "--mau-declaration", "below-700m"]) == 0
    assert all(torch.equal(v, ta[k]) for k, v in _read(tmp_path / "yaml").items())


def test_model_plus_lora_bad_references(scout_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such adapter directory") as e:
        merge_weights(scout_dir, [f"{scout_dir}+{tmp_path / 'nope'}"], tmp_path / "o", method="linear",
                      license_options=OPTS)
    assert e.value.exit_code == 3
    with pytest.raises(UsageError, match="is not MODEL\\+LORA"):
        merge_weights(scout_dir, [f"{scout_dir}+{tmp_path}+{tmp_path}"], tmp_path / "o", method="linear",
                      license_options=OPTS)
    assert not (tmp_path / "o").exists()
