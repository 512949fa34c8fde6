"""Supply-chain outputs for a finished artifact: signatures (OpenSSF model signing) and bills of
materials (CycloneDX ML-BOM, SPDX 2.3, SPDX 3.0.1). Both read the artifact as it is on disk; neither
changes a model file."""

# here, not in bom.py: the CLI offers the set without importing the libraries
BOM_FORMATS = ("cyclonedx", "spdx", "spdx3")
