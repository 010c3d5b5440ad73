"""HorNet Serve: the dynamically batched inference microservice over model bundles.

Everything the service knows about a model comes from its bundle (read through `hornet_bundle`);
`service.app.create_app` builds the ASGI app and `service.cli.serve_main` runs it.
"""

from importlib.metadata import version

__version__ = version("hornet-serve")
"""The installed distribution's version, as pyproject.toml states it: the one place it is
written."""
