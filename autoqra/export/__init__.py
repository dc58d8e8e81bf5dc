"""Export of compiled models for edge runtimes (ONNX, onnxruntime ``MatMulNBits``)."""

from autoqra.export.onnx_export import OnnxExportResult, export_onnx

__all__ = ["OnnxExportResult", "export_onnx"]
