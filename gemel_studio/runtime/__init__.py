"""The edge side (Qt-free, and free of the merging code): verified bundles, frame sources,
the memory-budgeted scheduler and the inference engine behind `gemel run`.

`engine`, `sources` and `metrics` are imported on use (they pull in OpenCV, torch.func and
prometheus_client).
"""

from .bundle import Bundle, BundleError, BundleManifest, load_bundle

__all__ = ["Bundle", "BundleError", "BundleManifest", "load_bundle"]
