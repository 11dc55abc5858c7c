"""The edge side (Qt-free, and free of the merging code): loading verified bundles.

The scheduler, sources and metrics of issue 4 build on `load_bundle`.
"""

from .bundle import Bundle, BundleError, BundleManifest, load_bundle

__all__ = ["Bundle", "BundleError", "BundleManifest", "load_bundle"]
