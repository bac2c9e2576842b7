"""Library notices a user can do nothing about, kept out of the output (issue 17, item 5).

Torch-free, so that the CLI can install the warning filters at start (before kserve or FastAPI answer a request)
without importing the model stack. ``model.loading.quiet_hf_progress`` adds the logging filter and transformers'
progress-bar switch when a model is loaded.
"""

from __future__ import annotations

import logging
import warnings

# Python warnings a user can do nothing about: (message regex, module regex, why). Each is raised inside a library
# by another library's deprecation, on every request or face: kserve answers with FastAPI's ORJSONResponse, which
# FastAPI >= 0.120 deprecates; insightface aligns every face with scikit-image's SimilarityTransform.estimate, which
# scikit-image 0.26 deprecates.
LIBRARY_WARNINGS = (
    (r"ORJSONResponse is deprecated", r"", "kserve's response class, deprecated by FastAPI"),
    (r"`estimate` is deprecated since version 0\.26", r"insightface\.", "insightface's face alignment, scikit-image"),
)


class LibraryNotices(logging.Filter):
    """Log records of transformers 5 and diffusers that say nothing about our runs: the PIL fallback of every image
    processor class (we use the PIL processors on purpose: torchvision is not in the stack), diffusers' advice on
    casting with ``to()`` when the list of modules to keep in float32 is empty, and its advice to install
    accelerate (not in the stack: our loads pass ``low_cpu_mem_usage=False``, but a library call that does not
    would still log it). Also LIBRARY_WARNINGS when they arrive as log records (``logging.captureWarnings``)."""

    NOISE = ("requires torchvision (not installed)", "should be kept in float32: []",
             "because `accelerate` was not found", "ORJSONResponse is deprecated",
             "FutureWarning: `estimate` is deprecated since version 0.26")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.NOISE)


def quiet_library_warnings() -> None:
    """Ignore LIBRARY_WARNINGS (each by its message and the module that raises it, so any other warning of those
    libraries still shows)."""
    for message, module, _why in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


__all__ = ["LIBRARY_WARNINGS", "LibraryNotices", "quiet_library_warnings"]
