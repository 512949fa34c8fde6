"""The Hugging Face Hub: gated downloads with access, license and space checked first.

`client` runs a download (plan, license, space, manifest); `listing` reads and validates what
the Hub says a repository holds; `transfer` moves and verifies the bytes; `state` is the output
directory's own bookkeeping; `http` and `limits` bound every request (timeouts, deadline,
redirects, answer and listing sizes); `gate` holds the license acceptance, `manifest` the
provenance record a download leaves, `errors` maps Hub failures to one-line errors (exit 4).
"""

from toolbox.hub.client import DownloadResult, download, human_size
from toolbox.hub.manifest import read_manifest

__all__ = ["DownloadResult", "download", "human_size", "read_manifest"]
