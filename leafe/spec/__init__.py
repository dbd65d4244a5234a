"""The versioned spec: schema, YAML loading with presets and overrides, validation."""

from leafe.spec.loader import LoadedSpec, load_spec
from leafe.spec.schema import SUPPORTED_VERSIONS, ModelSpec, Spec

__all__ = ["LoadedSpec", "ModelSpec", "SUPPORTED_VERSIONS", "Spec", "load_spec"]
