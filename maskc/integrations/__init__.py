"""Bridges from maskc to other libraries, each an optional dependency.

Nothing here is imported by ``import maskc``: a bridge is imported by name
(``import maskc.integrations.transformers``) and says what to install when its
library is missing.
"""
