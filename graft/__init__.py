"""graftline's algorithm library: checkpoints, deltas, importance scores, SkillPacks and grafting.

Pure functions and small classes over tensors, HF models and safetensors files. Nothing here
imports Ray or MLflow; the `pipelines` package orchestrates these pieces at scale.
"""

__version__ = "0.1.0"
