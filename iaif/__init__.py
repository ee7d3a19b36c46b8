"""iaif: interaction-aware influence functions for choosing instruction-tuning data."""

from iaif.common.provenance import package_version

__version__ = package_version()
