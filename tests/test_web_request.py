"""The parts of a web request the pipeline decides on (``mox_core.web.request``): the cleaned
path (as Go's path.Clean, which mox uses), the Host header (RFC 9110 §7.2), the client's IP
address, and mox's plain text answers. Through a real ``mox serve``: tests/test_web_server.py
and tests/security/test_b7_web.py."""

from __future__ import annotations

import asyncio

import pytest

from mox_core.web.request import BadRequest, clean_path, client_ip, header, parse_host, send_text


@pytest.mark.parametrize("path, clean", [
    ("", "/"),
    ("/", "/"),
    ("//", "/"),
    ("/a", "/a"),
    ("a", "/a"),
    ("a/b/", "/a/b/"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/a//b///c", "/a/b/c"),
    ("/a/./b/.", "/a/b"),
    ("/a/./b/./", "/a/b/"),
    ("/a/../b", "/b"),
    ("/a/b/../../c", "/c"),
    ("/a/b/..", "/a"),
    ("/a/b/../", "/a/"),
    ("/..", "/"),
    ("/../", "/"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/a/../../b", "/b"),
    ("/./", "/"),
    ("/.", "/"),
    ("/...", "/..."),
    ("/..a/b", "/..a/b"),
    ("/a../b", "/a../b"),
    ("/.hidden", "/.hidden"),
    ("/a/%2e%2e/b", "/a/%2e%2e/b"),  # already decoded: a literal "%2e%2e" is a name
])
def test_clean_path(path, clean):
    assert clean_path(path) == clean


@pytest.mark.parametrize("path", ["/a\x00b", "/\x00", "/a\\b", "\\", "/..\\..\\etc"])
def test_clean_path_refuses_nul_and_backslash(path):
    with pytest.raises(BadRequest, match="^bad path$"):
        clean_path(path)


@pytest.mark.parametrize("value, name, ip, port, domain", [
    ("example.org", "example.org", False, "", "example.org"),
    ("Example.ORG", "example.org", False, "", "example.org"),
    ("example.org.", "example.org", False, "", "example.org"),
    ("example.org:8080", "example.org", False, "8080", "example.org"),
    ("bücher.example", "xn--bcher-kva.example", False, "", "xn--bcher-kva.example"),
    ("127.0.0.1", "127.0.0.1", True, "", None),
    ("127.0.0.1:443", "127.0.0.1", True, "443", None),
    ("[::1]", "::1", True, "", None),
    ("[::1]:8443", "::1", True, "8443", None),
    ("[2001:DB8::1]:80", "2001:db8::1", True, "80", None),
    ("localhost", "localhost", False, "", "localhost"),
    ("WWW.EXAMPLEX", "www.examplex", False, "", "www.examplex"),
    ("mail.X.", "mail.x", False, "", "mail.x"),
])
def test_parse_host(value, name, ip, port, domain):
    h = parse_host(value)
    assert (h.name, h.ip, h.port, h.domain) == (name, ip, port, domain)


@pytest.mark.parametrize("value, text", [
    ("", "missing host"),
    ("[::1", "bad host"),
    ("[::1]x", "bad host"),
    ("[::1]80", "bad host"),
    ("[example.org]", "bad host"),
    ("[127.0.0.1]", "bad host"),
    ("example.org:http", "bad host"),
    ("example.org:80x", "bad host"),
    ("example.org:-1", "bad host"),
    ("[::1]:http", "bad host"),
    ("[::1]:80]", "bad host"),
    ("[::1]:-1", "bad host"),
    ("exa mple.org", "bad host"),
    ("a..b", "bad host"),
])
def test_parse_host_refuses(value, text):
    with pytest.raises(BadRequest, match=f"^{text}$"):
        parse_host(value)


def scope(headers: list[tuple[bytes, bytes]], client=("192.0.2.9", 5000)) -> dict:
    return {"headers": headers, "client": client}


def test_header_is_the_first_of_its_name():
    s = scope([(b"host", b"a.example"), (b"x-forwarded-for", b"198.51.100.1"), (b"x-forwarded-for", b"198.51.100.2"),
               (b"x-latin", "é".encode("latin-1"))])
    assert header(s, b"x-forwarded-for") == "198.51.100.1"
    assert header(s, b"host") == "a.example"
    assert header(s, b"x-latin") == "é"
    assert header(s, b"missing") == ""


@pytest.mark.parametrize("headers, forwarded, ip", [
    ([], False, "192.0.2.9"),
    ([], True, "192.0.2.9"),
    ([(b"x-forwarded-for", b"198.51.100.7")], False, "192.0.2.9"),   # not behind a proxy: ignored
    ([(b"x-forwarded-for", b"198.51.100.7")], True, "198.51.100.7"),
    ([(b"x-forwarded-for", b" 198.51.100.7 , 10.0.0.1")], True, "198.51.100.7"),  # the first
    ([(b"x-forwarded-for", b"2001:DB8::7")], True, "2001:db8::7"),
    ([(b"x-forwarded-for", b"not-an-ip, 198.51.100.7")], True, "192.0.2.9"),
    ([(b"x-forwarded-for", b"")], True, "192.0.2.9"),
])
def test_client_ip(headers, forwarded, ip):
    assert client_ip(scope(headers), forwarded) == ip


def test_client_ip_without_a_peer():
    assert client_ip({"headers": []}, False) == ""
    assert client_ip({"headers": [], "client": None}, True) == ""


def test_send_text():
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(send_text(send, 404, "404 - not found", [(b"x-extra", b"1")]))
    assert sent == [
        {"type": "http.response.start", "status": 404, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"16"),
            (b"x-content-type-options", b"nosniff"), (b"x-extra", b"1")]},
        {"type": "http.response.body", "body": b"404 - not found\n"},
    ]
    sent.clear()
    asyncio.run(send_text(send, 400, "bad host"))
    assert sent[0]["headers"] == [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"9"),
                                  (b"x-content-type-options", b"nosniff")]
