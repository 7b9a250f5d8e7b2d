"""Triton python-backend model running ldm-serve's latent diffusion pipeline.

Written by ``ldm-serve export-triton`` as ``<repository>/<model>/1/model.py``; edit the
``parameters`` of ``config.pbtxt`` (model file, backend, dtype, threads), not this file.
The python this runs in (the one first on the server's ``PATH``) needs ldm-serve
installed; the model is read from local files only, nothing reaches the network.

This file is the protocol boundary: Triton requests become plain numpy inputs for
:class:`worker.triton_model.TritonLDM` (which batches every request of an ``execute``
call into batched DDIM runs), and ldm-serve errors become ``TritonError`` responses
(``INVALID_ARG`` for a bad input, naming it and the limit; ``INTERNAL`` otherwise).
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

try:
    from ldm_serve.errors import InvalidInput
    from worker.triton_model import INPUT_NAMES, TritonLDM, load_triton_pipeline, settings_from_config
except ImportError as exc:  # pragma: no cover - only inside a misconfigured server
    raise ImportError(
        f"{exc}: install ldm-serve into the python the Triton python backend runs (first on PATH)"
    ) from exc


def _error(exc: Exception) -> "pb_utils.TritonError":
    code_name = "INVALID_ARG" if isinstance(exc, InvalidInput) else "INTERNAL"
    code = getattr(pb_utils.TritonError, code_name, None)
    message = f"{type(exc).__name__}: {exc}"
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    """One model instance: a loaded pipeline on this instance's device."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        settings = settings_from_config(
            config,
            Path(__file__).resolve().parent,  # the version folder: relative paths start here
            instance_kind=args.get("model_instance_kind", "CPU"),
            device_id=int(args.get("model_instance_device_id", 0) or 0),
        )
        pipeline, summary = load_triton_pipeline(settings)
        self.model = TritonLDM(pipeline)
        pb_utils.Logger.log_info(f"ldm-serve model {pipeline.name!r} from {settings.model}: {summary}")

    def execute(self, requests: list) -> list:
        live, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            if request.is_cancelled():
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
                )
            else:
                live.append(i)
        inputs = []
        for i in live:
            tensors = {name: pb_utils.get_input_tensor_by_name(requests[i], name) for name in INPUT_NAMES}
            inputs.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        for i, result in zip(live, self.model.execute(inputs), strict=True):
            if isinstance(result, Exception):
                responses[i] = pb_utils.InferenceResponse(error=_error(result))
            else:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGE", result)])
        return responses

    def finalize(self) -> None:
        self.model = None
