"""HorNet Serve: the dynamically batched inference microservice over model bundles.

Everything the service knows about a model comes from its bundle (`service.bundle`);
`service.app.create_app` builds the ASGI app and `service.cli.serve_main` runs it.
"""
