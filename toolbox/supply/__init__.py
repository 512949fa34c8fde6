"""Supply-chain outputs for a finished artifact: signatures (OpenSSF model signing) and bills of
materials (CycloneDX ML-BOM). Both read the artifact as it is on disk; neither changes a model file."""

BOM_FORMATS = ("cyclonedx", "spdx")  # here, not in bom.py: the CLI offers the set without importing the libraries
