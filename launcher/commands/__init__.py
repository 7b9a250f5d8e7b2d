"""The subcommands of ``ldm-serve``, one module per group; each has ``add_commands(subparsers)``.

* :mod:`launcher.commands.generate`: ``generate``, ``inpaint``, ``export-onnx`` (a model in-process, no queue)
* :mod:`launcher.commands.serve`: ``up``, ``gateway``, ``worker`` (the service)
* :mod:`launcher.commands.export_triton`: ``export-triton`` (a Triton model repository)
* :mod:`launcher.commands.keys`: ``hash-key`` (API keys for ``LDM_API_KEYS_FILE``)
"""
