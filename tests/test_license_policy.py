"""The policies are data that match the verbatim texts; declarations and names are refused
exactly when the license says so, with exit code 5 and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from license.policy import load_policy, policy_for_label, policy_ids
from license.stamp import Declaration, Stamp, fix_name, parse_declaration
from toolbox.errors import ExitCode, LicensePolicyError, UsageError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llama4"


def test_llama4_texts_are_the_reference_byte_for_byte() -> None:
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not beside this checkout")
    policy = load_policy("llama4")
    for name in ("LICENSE", "USE_POLICY.md"):
        assert policy.text_bytes(name) == (REFERENCE / name).read_bytes(), name


@pytest.mark.parametrize("policy_id", ["llama4", "llama3_1", "llama3_2", "llama3_3"])
def test_every_quoted_sentence_is_in_the_verbatim_texts(policy_id: str) -> None:
    p = load_policy(policy_id)
    license_text = p.text_bytes("LICENSE").decode("utf-8")
    use_policy = p.text_bytes("USE_POLICY.md").decode("utf-8")
    assert f"“{p.notice}”" in license_text  # the exact Notice, as the license quotes it
    assert f"“{p.attribution}”" in license_text
    assert f"“{p.name_prefix}” at the beginning of any such AI model name" in license_text
    assert p.use_policy_url in license_text
    assert f"greater than {p.mau_threshold // 1_000_000} million monthly active users" in license_text
    if p.multimodal_restriction:
        assert p.multimodal_restriction in use_policy
    assert set(p.clauses) >= {"agreement", "attribution", "name", "notice", "use_policy", "threshold", "label"}


def test_policies_listed_and_unknown_one_is_a_usage_error() -> None:
    assert policy_ids() == ["llama3_1", "llama3_2", "llama3_3", "llama4"]
    with pytest.raises(UsageError, match="llama3_1, llama3_2, llama3_3, llama4"):
        load_policy("llama5")
    with pytest.raises(UsageError):
        load_policy("../etc")


def test_license_labels_map_to_policies() -> None:
    p = load_policy("llama4")
    assert p.names_license("other", "llama4") and p.names_license("llama4") and p.names_license("llama-4-cla-2025")
    assert not p.names_license("other", None) and not p.names_license("apache-2.0") and not p.names_license("mit")
    assert policy_for_label("other", "llama3.2") is load_policy("llama3_2")
    assert policy_for_label("llama4") is p and policy_for_label("apache-2.0") is None


@pytest.mark.parametrize(("text", "canonical"), [
    ("below-700m", "below-700m"), (" BELOW-700M ", "below-700m"),
    ("meta-license:ACME-2025-17", "meta-license:ACME-2025-17"), ("meta-license: ref 9 ", "meta-license:ref 9"),
])
def test_valid_declarations(text: str, canonical: str) -> None:
    assert str(Declaration.parse(text)) == canonical


@pytest.mark.parametrize(("text", "says"), [
    ("above-700m", "exceeded without a license from Meta"),
    ("over-700m", "exceeded"),
    ("exceeds-threshold", "exceeded"),
    ("meta-license:", "names no license reference"),
    ("meta-license:   ", "names no license reference"),
    ("below-7m", "not one corral understands"),
    ("yes", "not one corral understands"),
])
def test_refused_declarations_exit_5(text: str, says: str) -> None:
    with pytest.raises(LicensePolicyError, match=says) as exc:
        Declaration.parse(text)
    assert exc.value.exit_code == ExitCode.LICENSE and exc.value.hint


def test_declaration_falls_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)
    with pytest.raises(LicensePolicyError, match="no declaration") as exc:
        parse_declaration(None)
    assert "--mau-declaration below-700m" in (exc.value.hint or "") and "CORRAL_MAU_DECLARATION" in exc.value.hint
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "meta-license:X-1")
    assert parse_declaration(None) == "meta-license:X-1"
    assert parse_declaration("below-700m") == "below-700m"  # an explicit value wins
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "above-700m")
    with pytest.raises(LicensePolicyError):
        Stamp.create("Llama-x")


@pytest.mark.parametrize(("name", "fixed"), [
    ("my-scout-ft", "Llama-my-scout-ft"), ("llama-4-x", "Llama-4-x"), ("LLAMA4", "Llama4"),
    ("Llama-4-Scout", "Llama-4-Scout"), ("  scout ", "Llama-scout"),
])
def test_fix_name(name: str, fixed: str) -> None:
    assert fix_name(name) == fixed


def test_a_name_without_the_prefix_is_refused_with_the_suggestion() -> None:
    with pytest.raises(LicensePolicyError) as exc:
        Stamp.create("my-scout-ft", declaration="below-700m")
    assert exc.value.exit_code == 5 and "Llama-my-scout-ft" in (exc.value.hint or "")
    assert "1.b.i" in exc.value.message
    assert Stamp.create("my-scout-ft", declaration="below-700m", fix=True).name == "Llama-my-scout-ft"
    with pytest.raises(LicensePolicyError):  # the model itself refuses, not only the factory
        Stamp(name="scout", declaration="below-700m")
    with pytest.raises(LicensePolicyError):
        Stamp(name="Llama\nx", declaration="below-700m")


def test_provenance_is_reproducible_and_follows_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    ops = {"operations": [{"op": "convert", "to": "gguf", "outtype": "Q8_0"}], "sources": {"a": "sha256:00"}}
    a = Stamp.create("Llama-x", declaration="below-700m", provenance=ops)
    b = Stamp.create("Llama-x", declaration="below-700m", provenance=ops)
    assert a.keys() == b.keys() and "created" not in json.loads(a.keys()["corral.provenance"])
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1743811200")
    c = Stamp.create("Llama-x", declaration="below-700m", provenance=ops, base_model="meta-llama/X")
    prov = json.loads(c.keys()["corral.provenance"])
    assert prov["created"] == "2025-04-05T00:00:00Z" and prov["operations"][0]["outtype"] == "Q8_0"
    assert prov["base_model"] == {"repo": "meta-llama/X"} and prov["corral_version"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError):
        Stamp.create("Llama-x", declaration="below-700m")
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    with pytest.raises(ValueError, match="'op'"):
        Stamp.create("Llama-x", declaration="below-700m", provenance={"operations": [{"to": "gguf"}]})
