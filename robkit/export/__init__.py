"""Export stage: students → ONNX / TFLite / Core ML / ExecuTorch files with parity checks and cards.

Heavy converters are imported lazily inside each format module, so ``import robkit.export``
stays cheap.  Entry point for code: :func:`robkit.export.exporter.export_model`.
"""
