"""ldm-serve: shared, torch-free pieces (errors, job contract, settings, CLI entry point)."""

__version__ = "0.1.0"
