"""What the tests share, imported as `tests.helpers.<module>`: bundle writers and their
numpy references, the app served in process, instrumented engines, upload encoding, the
demo bundles, the deployment readers, the tiny dense models, bench/'s scripts as modules.

Fixtures stay in the conftest.py files, which may import these; a test module imports
from here, never from a conftest.py or another test module. A real server process comes
from `service.testing.running_server`, which bench/ uses too.
"""
