"""The export core: one `export(variant_or_model, out_dir, options)` for every task.

Per task a small exporter (`classify`, `segment`, `detect`) writes the graph and checks
it with ONNX Runtime; what they share is here once: the ONNX Runtime session
(`session`), the named parity figures and the verdict (`parity`, ParityError), the fp16
policy (`fp16`), the manifest's common fields and the weights record (`fields`). The
bundle itself is written through the contract package, `hornet_bundle`. Importing this
package does not import torch.
"""

from model_export.export.core import export
from model_export.export.errors import ExportError, ParityError
from model_export.export.options import ExportOptions, ParityImages
from model_export.gf_mode import GFMode

__all__ = ["ExportError", "ExportOptions", "GFMode", "ParityError", "ParityImages", "export"]
