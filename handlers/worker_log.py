"""Worker-side logging tweaks (kept out of handler.py, which must define one class only)."""

from __future__ import annotations

import logging

__all__ = ["quiet_per_batch_log"]


class _DropPerBatchLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Backend received inference at")


def quiet_per_batch_log() -> None:
    """Drop the worker's "Backend received inference at" line, logged for every batch.

    TorchServe's worker prints it to stdout, where the frontend parses it and writes it to
    model_log.log: a disk write and a parse per batch for no information. Everything else
    the worker logs is kept.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropPerBatchLines) for f in handler.filters):
            handler.addFilter(_DropPerBatchLines())
