"""Training of the bundled text-to-image LDM on procedural scenes (CPU-friendly, deterministic per seed).

* :mod:`ldm.training.autoencoder`: KL autoencoder, L1/L2 reconstruction + small KL.
* :mod:`ldm.training.diffusion`: eps-prediction LDM with a jointly trained BERT text
  encoder, caption dropout for classifier-free guidance, EMA, ``scale_by_std``.
* :mod:`ldm.training.export`: the original single-file checkpoint + YAML + JSON +
  tokenizer + model card, loadable by :func:`ldm.pipeline.load_pipeline`.
* :mod:`ldm.training.run`: both stages with logging, resumable state and export
  (the engine of ``tools/train_bundled_model.py``); sizes in :mod:`ldm.training.presets`.
"""

from __future__ import annotations

from ldm.training.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer
from ldm.training.diffusion import DiffusionTrainConfig, LatentDiffusionTrainer
from ldm.training.ema import ExponentialMovingAverage
from ldm.training.export import ExportedModel, export_model

__all__ = [
    "AutoencoderTrainConfig",
    "AutoencoderTrainer",
    "DiffusionTrainConfig",
    "ExponentialMovingAverage",
    "ExportedModel",
    "LatentDiffusionTrainer",
    "export_model",
]
