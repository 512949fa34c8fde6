"""Other libraries' output, held to corral's switches: shown with -v, silent otherwise.

transformers and huggingface_hub log warnings and draw their own tqdm bars ("Loading weights")
on stderr; llama-cpp-python's default llama.cpp log callback prints every line llama.cpp logs
(model loading, quantization: ~150 lines) unless its logger's level is set. Without --verbose
their logging is held to errors and their bars are off (corral's own progress reports the stage);
with -q Python warnings are silenced too. Everything is restored afterwards, so a script or test
that calls `main()` several times keeps its own settings.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

# the loggers whose records reach the terminal during corral commands
_LOGGERS = ("transformers", "huggingface_hub", "accelerate", "torch.onnx", "onnxscript", "llama-cpp-python")
_QUIET_LEVEL = logging.CRITICAL + 1  # llama-cpp-python's callback prints when its logger's level <= the record's
_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextmanager
def third_party_output(*, verbose: bool, quiet: bool, progress: bool = True) -> Iterator[None]:
    """Hold third-party logging and progress bars to corral's -v / -q / --no-progress for one command."""
    with ExitStack() as stack:
        if not verbose:
            stack.enter_context(_environment(_ENV))
            stack.enter_context(_levels(logging.ERROR if not quiet else _QUIET_LEVEL, names=_LOGGERS[:-1]))
            stack.enter_context(_loaded_libraries(logs=True))
        elif quiet or not progress:  # -v shows their logs; their bars still follow --no-progress and -q
            stack.enter_context(_environment({"HF_HUB_DISABLE_PROGRESS_BARS": "1"}))
            stack.enter_context(_loaded_libraries(logs=False))
        stack.enter_context(_levels(logging.DEBUG if verbose else _QUIET_LEVEL, names=("llama-cpp-python",)))
        if quiet:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        yield


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables read when a library is imported during the command; restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def _levels(level: int, *, names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved, strict=True):
            lg.setLevel(old)


@contextmanager
def _loaded_libraries(*, logs: bool) -> Iterator[None]:
    """Libraries imported before the command (a script, a test) read no environment any more: use their API."""
    tf_logging = getattr(getattr(sys.modules.get("transformers"), "utils", None), "logging", None)
    hub_utils = sys.modules.get("huggingface_hub.utils")
    tf_state = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()) if tf_logging else None
    hub_disabled = hub_utils.are_progress_bars_disabled() if hub_utils else None
    if tf_logging is not None:
        if logs:
            tf_logging.set_verbosity(logging.ERROR)
        tf_logging.disable_progress_bar()
    if hub_utils is not None:
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if tf_logging is not None and tf_state is not None:
            tf_logging.set_verbosity(tf_state[0])
            if tf_state[1]:
                tf_logging.enable_progress_bar()
        if hub_utils is not None and hub_disabled is False:
            hub_utils.enable_progress_bars()
