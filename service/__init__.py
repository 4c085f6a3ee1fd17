"""The torch-free runtime: bundle format, image decoding, ONNX engine, post-processing, calibration, REST API.

Nothing in this package may import torch, torchvision, `models` or `training`: the factory image
carries none of them.
"""
