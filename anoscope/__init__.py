"""anoscope: industrial visual anomaly detection with GAN detectors served over ONNX Runtime."""

__version__ = "0.1.0"
