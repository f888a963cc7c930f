"""Keep converters' chatter (progress lines, warnings) out of the CLI's output."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def captured_output(tool: str, *, silence: tuple[str, ...] = ()) -> Iterator[None]:
    """Redirect stdout/stderr and warnings while `tool` runs; replay them at debug level."""
    for name in silence:
        logging.getLogger(name).setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        warnings.simplefilter("ignore")
        yield
    for line in (out.getvalue() + err.getvalue()).splitlines():
        if line.strip():
            logger.debug("%s: %s", tool, line)


#: third-party loggers that talk at INFO/WARNING about their own internals
NOISY_LOGGERS = (
    "absl",
    "tensorflow",
    "h5py",
    "onnxscript",
    "torch.onnx",
    "botocore",
    "flwr",
    "alembic",
)


def quiet_third_party(verbose: int = 0) -> None:
    """CLI output shows edgefleet's messages only: libraries' loggers at ERROR unless -vv."""
    if verbose >= 2:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
