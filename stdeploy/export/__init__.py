"""Exporters of the folded spiking transformer: NIR and ONNX."""
