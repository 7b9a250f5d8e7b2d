"""Turning files into models: checkpoint formats, configuration and family detection.

* :mod:`ldm.loading.checkpoint`: reading single-file checkpoints (safetensors / pickle), prefixes.
* :mod:`ldm.loading.config_yaml`: the original LDM / SD YAML <-> :class:`ldm.config.ModelConfig`.
* :mod:`ldm.loading.detect`: inferring the family and configuration from weights alone.
* :mod:`ldm.loading.diffusers_format`: diffusers folders (``unet/``, ``vae/``, ``text_encoder/``...).
* :mod:`ldm.loading.loader`: :func:`load_model`, all of the above into a :class:`LoadedModel`.

Loading builds networks (:mod:`ldm.unet`, :mod:`ldm.autoencoder`, :mod:`ldm.encoders`) and
never imports sampling, execution, the pipeline or the engine (``tests/unit/test_layering.py``).
"""
