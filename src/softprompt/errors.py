"""Exception types. One class per kind of problem, each message names the value and the fix."""

from __future__ import annotations


class SoftPromptError(Exception):
    """Base class of every error raised by softprompt."""


class UnsupportedModelError(SoftPromptError):
    """The model family bypasses transformers' attention interface (e.g. DeBERTa), so prefixes cannot reach it."""


class ConfigError(SoftPromptError, ValueError):
    """An invalid method configuration: unknown method, unknown option or out-of-range value."""


class AdapterMismatchError(SoftPromptError, ValueError):
    """An adapter was saved for a different base model (hidden size, layers, heads or model type differ)."""


class AdapterFormatError(SoftPromptError, ValueError):
    """An adapter folder is missing files, holds corrupt/truncated files or tensors of the wrong shape or dtype."""


class SequenceTooLongError(SoftPromptError, ValueError):
    """Prefix/prompt plus sequence length exceeds the model's position limit."""


class NonFiniteLossError(SoftPromptError, RuntimeError):
    """Training produced a NaN or infinite loss."""
