"""Top-level fields of a request body that its schema does not know. They are ignored, as vLLM and the hosted API
ignore them (SDKs send extras this way), but each name is logged once and counted by endpoint, so a client that
relies on a parameter kvgate does not implement can be found."""

from __future__ import annotations

import logging

import msgspec
from prometheus_client import Counter

logger = logging.getLogger("kvgate.gateway")

# Only the keys are read: the values stay unparsed spans of the body, so this costs one scan of bytes the full
# decode has just read, with nothing built from them.
_KEYS = msgspec.json.Decoder(dict[str, msgspec.Raw])
MAX_NAMES = 100  # distinct (field, endpoint) series; past it, or for a longer name, the name counts as OTHER
# (so does a name with characters outside printable ASCII: line breaks and NULs in label values break scrapers)
MAX_NAME_CHARS = 64
OTHER = "_other"


def _printable(name: str) -> bool:
    return name.isascii() and name.isprintable()


class UnknownFields:
    """counter: a Prometheus counter labelled field and endpoint (the server's), or None (the batch runner's);
    `counts` holds the same numbers either way."""

    def __init__(self, counter: Counter | None = None) -> None:
        self._counter = counter
        self._known: dict[type, frozenset[str]] = {}
        self._seen: set[tuple[str, str]] = set()  # what has been logged: it bounds the counter's series too
        self.counts: dict[tuple[str, str], int] = {}

    def check(self, body: bytes, struct: type, endpoint: str) -> None:
        """Count (and, the first time, log) each top-level key of body, a valid struct, that struct lacks."""
        self.check_keys(_KEYS.decode(body).keys(), struct, endpoint)

    def check_keys(self, keys, struct: type, endpoint: str) -> None:
        known = self._known.get(struct)
        if known is None:
            known = self._known[struct] = frozenset(struct.__struct_fields__)
        for name in keys - known:
            self._count(name, endpoint)

    def _count(self, name: str, endpoint: str) -> None:
        key = (name, endpoint)
        if key not in self._seen:
            if len(name) > MAX_NAME_CHARS or not _printable(name) or len(self._seen) >= MAX_NAMES:
                key = (OTHER, endpoint)
            if key not in self._seen:
                self._seen.add(key)
                if key[0] == OTHER:
                    logger.warning("unknown request fields on %s past %d names, over %d characters or not printable "
                                   "ASCII are counted as %s, not logged (first: %.80r)", endpoint, MAX_NAMES, MAX_NAME_CHARS, OTHER,
                                   name)
                else:
                    logger.warning("unknown request field %r on %s: ignored", name, endpoint)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self._counter is not None:
            self._counter.labels(field=key[0], endpoint=endpoint).inc()
