"""What an export raises when it cannot deliver a verified bundle.

Invalid arguments (an unknown option, a label list of the wrong length, a model of
another task) raise ValueError before anything is written.
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """The export could not produce a verified bundle; the message says why."""


class ParityError(ExportError):
    """An exported graph disagrees with its reference beyond tolerance.

    Raised after the bundle is written, with its parity records marked failed, so the
    failing artefact can be inspected.
    """
