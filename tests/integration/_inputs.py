"""Request bodies the bad-input tests send, shared so each route is tried with all of them."""

from __future__ import annotations

# Bodies no JSON reader takes: cut short, a bare word, a trailing comma, not UTF-8. An
# empty body is not among them: where a body is optional it means "every default", and
# the routes that require one are given EMPTY_BODIES too.
NOT_JSON = [b"{", b"nul", b'{"name": "x",}', b"\xff\xfe"]

# Bodies with nothing in them: refused where a body is required.
EMPTY_BODIES = [b"", b"  ", b"  \n"]
