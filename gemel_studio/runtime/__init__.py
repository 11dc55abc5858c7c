"""The edge side (Qt-free, and free of the merging code): verified bundles, frame sources,
the memory-budgeted scheduler and the inference engine behind `gemel run`.

Modules, one concern each: `bundle` (load and verify), `sources` (frames in), `options` (how a
run runs; torch-free, so the command builds its flags without torch), `scheduler` (what is
resident), `layered` (layer-by-layer loading), `backends` (torch, onnxruntime), `batching`
(which frames run next), `engine` (the run loop), `heap` (freed memory back to the system),
`telemetry` (snapshots, summaries, memory probes), `summary_text`, `sinks` and `metrics`. The bundle names below are imported on first
use, so that importing `gemel_studio.runtime.options` does not pull in torch.
"""

from __future__ import annotations

import importlib

_BUNDLE_NAMES = ("Bundle", "BundleError", "BundleManifest", "load_bundle")


def __getattr__(name: str):
    if name in _BUNDLE_NAMES:
        return getattr(importlib.import_module(".bundle", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_BUNDLE_NAMES)
