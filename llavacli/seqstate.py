"""A sequence's saved state (llama_state_seq_get_data) in one form, whatever KV cache it came from.

The format (llama-context.cpp state_seq_get_data, llama-kv-cache.cpp state_write): a magic number and the
sequence id (4 bytes each), the number of KV streams, then per stream its cell count and, if not 0, its
cells. A lone conversation's cache has one stream; a batch's (non-unified) one per sequence, and the cells
of a sequence all sit in its own stream, so the others are bare zero counts. llama.cpp refuses a state
with another number of streams than the cache it goes into, so the engine stores states as a one-stream
cache writes them and widens them on the way back in.
"""

from __future__ import annotations

import struct

_U32 = struct.Struct("<I")
_STREAMS_AT = 8


def as_one_stream(data: memoryview, n_stream: int) -> memoryview | bytes:
    """A sequence's state from a cache of n_stream streams, as a one-stream cache writes it (unchanged if it
    is not laid out as expected: llama.cpp then refuses it, and the work is done again)."""
    if n_stream == 1 or len(data) < _STREAMS_AT + 4 * (n_stream + 1):
        return data
    if _U32.unpack_from(data, _STREAMS_AT)[0] != n_stream:
        return data
    empty_before = 0
    at = _STREAMS_AT + 4
    while empty_before < n_stream and _U32.unpack_from(data, at)[0] == 0:
        empty_before, at = empty_before + 1, at + 4
    if empty_before == n_stream:  # a sequence with no cells
        return bytes(data[:_STREAMS_AT]) + _U32.pack(1) + _U32.pack(0)
    tail = 4 * (n_stream - empty_before - 1)
    if any(data[len(data) - tail :]):
        return data
    return bytes(data[:_STREAMS_AT]) + _U32.pack(1) + bytes(data[at : len(data) - tail])


def as_streams(data: bytes, n_stream: int) -> bytes:
    """A one-stream state for a cache of n_stream streams: its cells in the first stream's place (llama.cpp
    puts them in the stream of the sequence it loads them into), the other streams empty."""
    if n_stream == 1 or len(data) < _STREAMS_AT + 4 or _U32.unpack_from(data, _STREAMS_AT)[0] != 1:
        return data
    return bytes(data[:_STREAMS_AT]) + _U32.pack(n_stream) + bytes(data[_STREAMS_AT + 4 :]) + bytes(4 * (n_stream - 1))
