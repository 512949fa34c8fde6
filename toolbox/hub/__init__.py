"""The Hugging Face Hub: gated downloads with access, license and space checked first.

`client` fetches and verifies files, `gate` holds the license acceptance, `manifest` the
provenance record a download leaves, `errors` maps Hub failures to one-line errors.
"""

from toolbox.hub.client import DownloadResult, download, human_size
from toolbox.hub.manifest import read_manifest

__all__ = ["DownloadResult", "download", "human_size", "read_manifest"]
