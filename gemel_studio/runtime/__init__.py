"""The edge side (Qt-free, and free of the merging code): verified bundles, frame sources,
the memory-budgeted scheduler and the inference engine behind `gemel run`.

`engine` and `sources` are imported on use (they pull in OpenCV and torch.func); the metrics
endpoint of issue 4 is still to come.
"""

from .bundle import Bundle, BundleError, BundleManifest, load_bundle

__all__ = ["Bundle", "BundleError", "BundleManifest", "load_bundle"]
