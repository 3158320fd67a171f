"""The HTTP request-smuggling and limits corpus (RFC 9112 and known smuggling classes).

One table, used by the test (tests/hardening/test_smuggling.py) and checked
against the table in docs/security.md, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    name: str
    family: str
    reference: str
    request: bytes
    status: int
    code: str


def _post(*headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST /v1/cmd/echo HTTP/" + version + b"\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def _get(target: bytes = b"/v1/health", *headers: bytes, version: bytes = b"HTTP/1.1", method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


_CHUNKED = b"Transfer-Encoding: chunked"
_LAST = b"0\r\n\r\n"
_INNER = b"GET /v1/health HTTP/1.1\r\nHost: y\r\n\r\n"
_BODY = b'4\r\n"hi"\r\n0\r\n\r\n'

#: Requests the server must refuse, answering ``status`` with error ``code``
#: and closing the connection (a request pipelined after it is never answered).
REFUSED: list[Case] = [
    # --- CL.TE / TE.CL: both framings on one message -----------------------------
    Case("cl-te", "CL.TE", "RFC 9112 §6.3", _post(b"Content-Length: 4", _CHUNKED, body=_LAST), 400, "bad_request"),
    Case("te-cl", "TE.CL", "RFC 9112 §6.3", _post(_CHUNKED, b"Content-Length: 6", body=_BODY), 400, "bad_request"),
    # --- TE.TE: Transfer-Encoding obfuscations ------------------------------------
    Case("te-unknown-coding", "TE.TE", "RFC 9112 §6.1", _post(b"Transfer-Encoding: xchunked", body=_LAST), 501, "bad_request"),
    Case("te-chunked-not-last", "TE.TE", "RFC 9112 §6.1", _post(b"Transfer-Encoding: chunked, identity", body=_LAST), 501, "bad_request"),
    Case("te-gzip-chunked", "TE.TE", "RFC 9112 §6.1", _post(b"Transfer-Encoding: gzip, chunked", body=_LAST), 501, "bad_request"),
    Case("te-twice-different", "TE.TE", "RFC 9112 §6.1", _post(_CHUNKED, b"Transfer-Encoding: identity", body=_LAST), 501, "bad_request"),
    Case("te-twice-same", "TE.TE", "RFC 9112 §6.1", _post(_CHUNKED, _CHUNKED, body=_LAST), 501, "bad_request"),
    Case("te-quoted", "TE.TE", "RFC 9112 §6.1", _post(b'Transfer-Encoding: "chunked"', body=_LAST), 501, "bad_request"),
    Case("te-vertical-tab", "TE.TE", "RFC 9110 §5.5", _post(b"Transfer-Encoding:\x0bchunked", body=_LAST), 400, "bad_request"),
    Case("te-obs-fold", "TE.TE", "RFC 9112 §5.2", _post(b"Transfer-Encoding:\r\n chunked", body=_LAST), 400, "bad_request"),
    Case("te-space-before-colon", "TE.TE", "RFC 9112 §5.1", _post(b"Transfer-Encoding : chunked", body=_LAST), 400, "bad_request"),
    Case("te-in-http10", "TE.TE", "RFC 9112 §6.1", _post(_CHUNKED, body=_BODY, version=b"1.0"), 400, "bad_request"),
    # --- Content-Length -------------------------------------------------------------
    Case("cl-twice-different", "CL.CL", "RFC 9112 §6.3", _post(b"Content-Length: 4", b"Content-Length: 5", body=b'"hi"x'), 400, "bad_request"),
    Case("cl-twice-same", "CL.CL", "RFC 9112 §6.3", _post(b"Content-Length: 4", b"Content-Length: 4", body=b'"hi"'), 400, "bad_request"),
    Case("cl-list", "CL.CL", "RFC 9112 §6.3", _post(b"Content-Length: 4, 4", body=b'"hi"'), 400, "bad_request"),
    Case("cl-signed-plus", "CL", "RFC 9110 §8.6", _post(b"Content-Length: +4", body=b'"hi"'), 400, "bad_request"),
    Case("cl-negative", "CL", "RFC 9110 §8.6", _post(b"Content-Length: -1"), 400, "bad_request"),
    Case("cl-hex", "CL", "RFC 9110 §8.6", _post(b"Content-Length: 0x4", body=b'"hi"'), 400, "bad_request"),
    Case("cl-inner-space", "CL", "RFC 9110 §8.6", _post(b"Content-Length: 4 4", body=b'"hi"'), 400, "bad_request"),
    Case("cl-empty", "CL", "RFC 9110 §8.6", _post(b"Content-Length: "), 400, "bad_request"),
    Case("cl-overflow", "CL", "RFC 9110 §8.6", _post(b"Content-Length: 99999999999999999999999"), 400, "bad_request"),
    Case("cl-over-limit", "limits", "RFC 9110 §15.5.14", _post(b"Content-Length: 99999999"), 413, "message_too_big"),
    # --- chunked bodies -------------------------------------------------------------
    Case("chunk-size-overflow", "chunked", "RFC 9112 §7.1", _post(_CHUNKED, body=b"FFFFFFFFFFFFFFFFFFFFFF\r\nx\r\n" + _LAST), 400, "bad_request"),
    Case("chunk-size-junk", "chunked", "RFC 9112 §7.1", _post(_CHUNKED, body=b'4g\r\n"hi"\r\n' + _LAST), 400, "bad_request"),
    Case("chunk-size-0x", "chunked", "RFC 9112 §7.1", _post(_CHUNKED, body=b'0x4\r\n"hi"\r\n' + _LAST), 400, "bad_request"),
    Case("chunk-size-leading-space", "chunked", "RFC 9112 §7.1", _post(_CHUNKED, body=b' 4\r\n"hi"\r\n' + _LAST), 400, "bad_request"),
    Case("chunk-data-no-crlf", "chunked", "RFC 9112 §7.1", _post(_CHUNKED, body=b'4\r\n"hi"XX' + _LAST), 400, "bad_request"),
    Case("chunk-line-bare-lf", "chunked", "RFC 9112 §7.1", _post(_CHUNKED, body=b'4\n"hi"\r\n' + _LAST), 400, "bad_request"),
    Case("chunk-extension-too-long", "chunked", "RFC 9112 §7.1.1", _post(_CHUNKED, body=b"4;" + b"a" * 100_000 + b'\r\n"hi"\r\n' + _LAST), 431, "message_too_big"),
    # --- header syntax --------------------------------------------------------------
    Case("obs-fold", "headers", "RFC 9112 §5.2", _get(b"/v1/health", b"Host: x", b"X-A: a", b" b"), 400, "bad_request"),
    Case("whitespace-first-header", "headers", "RFC 9112 §2.2", _get(b"/v1/health", b" Host: x"), 400, "bad_request"),
    Case("whitespace-before-colon", "headers", "RFC 9112 §5.1", _get(b"/v1/health", b"Host : x"), 400, "bad_request"),
    Case("space-in-field-name", "headers", "RFC 9110 §5.1", _get(b"/v1/health", b"Host: x", b"X A: b"), 400, "bad_request"),
    Case("empty-field-name", "headers", "RFC 9110 §5.1", _get(b"/v1/health", b"Host: x", b": b"), 400, "bad_request"),
    Case("bare-cr-in-value", "headers", "RFC 9112 §2.2", _get(b"/v1/health", b"Host: x", b"X-A: a\rb"), 400, "bad_request"),
    Case("bare-lf-line-ending", "headers", "RFC 9112 §2.2", b"GET /v1/health HTTP/1.1\nHost: x\n\n", 400, "bad_request"),
    Case("nul-in-value", "headers", "RFC 9110 §5.5", _get(b"/v1/health", b"Host: x", b"X-A: a\x00b"), 400, "bad_request"),
    Case("no-host", "headers", "RFC 9112 §3.2", _get(b"/v1/health"), 400, "bad_request"),
    Case("two-hosts", "headers", "RFC 9112 §3.2", _get(b"/v1/health", b"Host: x", b"Host: y"), 400, "bad_request"),
    Case("too-many-fields", "limits", "RFC 6585 §5", _get(b"/v1/health", b"Host: x", *(b"X-%d: y" % i for i in range(200))), 431, "message_too_big"),
    Case("field-line-too-long", "limits", "RFC 6585 §5", _get(b"/v1/health", b"Host: x", b"X-A: " + b"a" * 20_000), 431, "message_too_big"),
    # --- request line and target ------------------------------------------------------
    Case("absolute-form", "target", "RFC 9112 §3.2.2", _get(b"http://evil.example/v1/health", b"Host: x"), 400, "bad_request"),
    Case("asterisk-form-get", "target", "RFC 9112 §3.2.4", _get(b"*", b"Host: x"), 400, "bad_request"),
    Case("relative-target", "target", "RFC 9112 §3.2.1", _get(b"v1/health", b"Host: x"), 400, "bad_request"),
    Case("control-char-in-target", "target", "RFC 9112 §3", _get(b"/v1/he\x7falth", b"Host: x"), 400, "bad_request"),
    Case("two-spaces-in-line", "request line", "RFC 9112 §3", b"GET  /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    Case("tab-separator", "request line", "RFC 9112 §3", b"GET\t/v1/health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    Case("request-line-too-long", "limits", "RFC 9112 §3", _get(b"/" + b"a" * 20_000, b"Host: x"), 414, "message_too_big"),
    # --- versions ---------------------------------------------------------------------
    Case("http-2.0-line", "version", "RFC 9112 §2.3", _get(b"/v1/health", b"Host: x", version=b"HTTP/2.0"), 505, "bad_request"),
    Case("http-0.9-line", "version", "RFC 9112 §2.3", _get(b"/v1/health", b"Host: x", version=b"HTTP/0.9"), 505, "bad_request"),
    Case("http-version-junk", "version", "RFC 9112 §2.3", _get(b"/v1/health", b"Host: x", version=b"HTTP/1.1.1"), 400, "bad_request"),
    Case("http-version-no-minor", "version", "RFC 9112 §2.3", _get(b"/v1/health", b"Host: x", version=b"HTTP/3"), 400, "bad_request"),
]

#: Tricky but valid requests: answered normally, and the connection stays usable
#: (the request pipelined after each is answered too), with exactly ``responses``
#: answers in all — an extra one would mean a body was run as a request.
ACCEPTED: list[tuple[str, str, bytes, int]] = [
    ("chunk-extension-ignored", "RFC 9112 §7.1.1: extensions are ignored", _post(_CHUNKED, body=b'4;a=b\r\n"hi"\r\n' + _LAST), 2),
    ("get-with-body-not-a-request", "RFC 9110 §9.3.1: the body is read, never parsed", _get(b"/v1/health", b"Host: x", b"Content-Length: %d" % len(_INNER)) + _INNER, 2),
    ("tab-as-whitespace", "RFC 9110 §5.5: OWS may be a tab", _post(b"Content-Length:\t4", body=b'"hi"'), 2),
    ("chunked-upper-case", "RFC 9112 §7: codings are case-insensitive", _post(b"Transfer-Encoding: CHUNKED", body=_BODY), 2),
]


def markdown_table() -> str:
    """The corpus as the Markdown table docs/security.md carries (between its markers)."""
    rows = ["| case | class | reference | answer |", "|---|---|---|---|"]
    rows += [f"| `{c.name}` | {c.family} | {c.reference} | {c.status} `{c.code}`, closed |" for c in REFUSED]
    rows += [f"| `{name}` | valid | {why} | served, connection kept |" for name, why, _, _ in ACCEPTED]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m tests.hardening.smuggling > table.md
    print(markdown_table(), end="")
