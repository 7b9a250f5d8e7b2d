"""The ``ldm-serve`` launcher: the command line and the processes it starts.

The top layer: it may import every other package (``service``, ``worker``, ``ldm``, ``ldm_serve``),
and nothing imports it. Heavy imports (torch, FastAPI) happen inside the subcommands, so
``ldm-serve --help`` is fast.
"""
