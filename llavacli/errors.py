"""The errors a user sees: each carries a one-line message that names the file, option or model at fault.

The CLI prints `llava: error: <message>` and exits 1 for any LlavaError; anything else is a bug.
"""

from __future__ import annotations


class LlavaError(Exception):
    """Base of every user-facing error."""


class InputError(LlavaError):
    """An image, image list or other input that cannot be used."""


class ModelError(LlavaError):
    """A model name, GGUF path or download that cannot be used."""


class ConvertError(LlavaError):
    """A checkpoint that cannot be converted."""


class BackendError(LlavaError):
    """llama.cpp could not do what was asked (context full, decode failed)."""
