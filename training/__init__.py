"""Offline commands: train, export, evaluate, generate, bench. PyTorch + the torch-free service core.

Training entry points: `training.train.train(TrainConfig(...))` and `anoscope train`; checkpoints are
read back with `training.checkpoint.load_trained(run_dir_or_pt)`.
"""
