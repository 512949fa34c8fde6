"""Llama license compliance: policies as data, stamping into every output, and the audit.

policy (the obligations, `policies/*.yaml`, with the verbatim `texts/`), keys (the metadata
namespace), stamp (`Stamp`, `Declaration`, per-format views, sidecars), card (the model card),
artifact (what an artifact is, from headers), retrofit (`stamp_artifact`), audit
(`check_artifact`), sarif. See README.md here for the obligations and the keys.
"""
