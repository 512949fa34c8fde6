"""`corral sign --sigstore` / `verify --identity`: keyless signing is unattended and fails cleanly.

A real keyless signature needs Sigstore's public Fulcio, Rekor and TUF services, which this test
machine cannot reach; what is checked here is what corral promises around them: no OIDC token -> exit
2 before any work (never an interactive browser flow), a token that cannot be used (no network here,
a refused fake token where there is one) -> one line, exit 4, the token nowhere in the output, no
signature file left; and the option conflicts. The CLI runs in a subprocess with every CI credential
variable removed, so sigstore's ambient detection finds nothing, and sigstore's caches in a temp dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec

CI_VARS = ("SIGSTORE_ID_TOKEN", "GITHUB_ACTIONS", "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
           "GITLAB_CI", "BUILDKITE", "CIRCLECI", "GOOGLE_SERVICE_ACCOUNT_NAME", "GOOGLE_APPLICATION_CREDENTIALS")
# a well-formed but unsigned JWT with a distinctive payload, so any echo of it is easy to find
FAKE_TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJjb3JyYWwtdGVzdC1zZWNyZXQtNzc3In0.c2VjcmV0LXRva2VuLTc3Nw"


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama4"}')
    (model / "weights.bin").write_bytes(os.urandom(4096))
    return model


def _corral(tmp_path: Path, *args: str, token: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in CI_VARS}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), XDG_DATA_HOME=str(tmp_path / "xdg-data"))
    if token is not None:
        env["SIGSTORE_ID_TOKEN"] = token
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "toolbox.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, time.monotonic() - t0


def _message(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr as corral's error format: one `error:` line, at most one `hint:` line, nothing else."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and len(lines) <= 2, proc.stderr
    assert len(lines) == 1 or lines[1].startswith("hint:"), proc.stderr
    return lines


def test_keyless_sign_without_a_token_stops_before_any_work(tmp_path: Path, artifact: Path) -> None:
    proc, _ = _corral(tmp_path, "sign", str(artifact), "--sigstore")
    assert proc.returncode == 2, proc.stderr
    lines = _message(proc)
    assert "SIGSTORE_ID_TOKEN" in " ".join(lines) and "Traceback" not in proc.stderr
    assert not (artifact / "model.sig").exists()
    proc, _ = _corral(tmp_path, "--json", "sign", str(artifact), "--sigstore")
    assert proc.returncode == 2 and json.loads(proc.stdout)["exit_code"] == 2


def test_an_unusable_token_is_one_line_exit_4_and_never_printed(tmp_path: Path, artifact: Path) -> None:
    proc, seconds = _corral(tmp_path, "sign", str(artifact), "--sigstore", token=FAKE_TOKEN)
    assert proc.returncode == 4, proc.stderr
    assert seconds < 60
    assert "Sigstore" in _message(proc)[0], proc.stderr
    for secret in (FAKE_TOKEN, "c2VjcmV0LXRva2VuLTc3Nw", "corral-test-secret"):
        assert secret not in proc.stdout + proc.stderr
    assert not (artifact / "model.sig").exists()
    assert not any(p.name.startswith(".model.sig") for p in artifact.iterdir())
    proc, _ = _corral(tmp_path, "--json", "sign", str(artifact), "--sigstore", token=FAKE_TOKEN)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 4 and doc["exit_code"] == 4 and FAKE_TOKEN not in proc.stdout


def test_keyless_option_conflicts_are_usage_errors(tmp_path: Path, artifact: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "key.pem", tmp_path / "pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    for args in (["--key", str(private), "--sigstore"], ["--sigstore", "--certificate", str(public)], []):
        proc, _ = _corral(tmp_path, "sign", str(artifact), *args, token=FAKE_TOKEN)
        assert proc.returncode == 2, (args, proc.stderr)
        assert not (artifact / "model.sig").exists()
    proc, _ = _corral(tmp_path, "sign", str(artifact), "--key", str(private))
    assert proc.returncode == 0, proc.stderr
    for args in (["--identity", "ci@example.com"],  # no --oidc-issuer
                 ["--identity", "ci@example.com", "--oidc-issuer", "https://issuer.example", "--public-key",
                  str(public)]):
        proc, _ = _corral(tmp_path, "verify", str(artifact), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
