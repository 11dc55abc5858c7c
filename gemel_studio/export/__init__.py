"""Writing deployable bundles from merged folders (may use the merging code; the edge
runtime that loads bundles lives in `gemel_studio.runtime` and does not)."""

from .bundle import ExportCheck, ExportResult, ModelExport, export_bundle

__all__ = ["ExportCheck", "ExportResult", "ModelExport", "export_bundle"]
