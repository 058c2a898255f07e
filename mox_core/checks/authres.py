"""SPF and DKIM checks of incoming mail, summarised in an Authentication-Results header.

pyspf and dkimpy are synchronous; :func:`check` runs them in a thread, with DNS through the
resolver from ``[dns]`` in mox.toml, unless every record they need is in the resolver's cache:
then in the event loop, without a thread hand-off. DKIM verification is dkimpy's with its
costly steps done in C (:class:`_Verifier`), after a fast path that says "pass" for the usual
signature that verifies (``dkimverify``). Results follow RFC 8601.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass, field

import dkim
import dns.exception
import dns.resolver
import spf
import structlog
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from mox_core.checks.dkimverify import Message, rsa_verify
from mox_core.dns.resolver import CacheOnly, cached_answer
from mox_core.outgoing.dkimsign import canonical_body

log = structlog.get_logger(component="authres")

_SIG = re.compile(rb"^dkim-signature:", re.I | re.M)
VERIFY_IN_LOOP_MAX = 256 * 1024  # larger messages are verified in a thread (hashing their body)


@dataclass
class AuthResults:
    spf: str = "none"
    spf_domain: str = ""
    dkim: list[tuple[str, str, str]] = field(default_factory=list)  # (result, d=, s=)

    def header(self, hostname: str, ip: str) -> bytes:
        parts = [f"spf={self.spf} smtp.mailfrom={self.spf_domain or '<>'}"]
        if not self.dkim:
            parts.append("dkim=none")
        for result, d, s in self.dkim:
            parts.append(f"dkim={result} header.d={d} header.s={s}" if d else f"dkim={result}")
        text = f"Authentication-Results: {hostname};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"
        return text.encode("utf-8", "replace")


def _dkim_dnsfunc(resolver: dns.resolver.Resolver):
    """dkimpy's key lookup through ``resolver``; from its cache alone under :class:`CacheOnly`
    (a miss sets ``missed``: the caller then throws the verification away)."""
    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        cache_only = CacheOnly.current()
        if cache_only is not None:
            answer = cached_answer(resolver, qname, "TXT")
            if answer is None:
                cache_only.missed = True
                return None
        else:
            try:
                answer = resolver.resolve(qname, "TXT", raise_on_no_answer=False, lifetime=timeout)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
                return None
            except dns.exception.Timeout as exc:
                raise dkim.DnsTimeoutError(str(exc)) from None
        for rr in answer.rrset or []:
            return b"".join(rr.strings)
        return None

    return get_txt


class _Verifier(dkim.DKIM):
    """dkimpy's DKIM verification, with the steps that cost most done in C instead: splitting
    the message (dkimpy splits all of it into lines; only the header needs that), the body
    hash (``dkimsign.canonical_body``, equal to dkimpy's canonicalization, whose regular
    expressions take 4 ms per 100 KB) and the RSA signature check (OpenSSL through
    ``cryptography``; dkimpy's is Python, 0.3-0.45 ms). A signed message: 2 KB 0.6-0.8 -> 0.27
    ms, 100 KB 4.3-6.3 -> 0.5 ms, nearly all of it holding the GIL before. The signature's tags, the key
    record, the choice and hashing of the signed header fields stay dkimpy's.

    Only for messages with CRLF line endings throughout, as the SMTP DATA reader passes them.
    """

    def set_message(self, message: bytes) -> None:
        end = message.find(b"\r\n\r\n") if message else -1
        if end < 0:
            super().set_message(message)
            return
        super().set_message(message[: end + 4])
        self.body = message[end + 4:]

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):  # type: ignore[no-untyped-def]
        if b"bh" not in sig or self.tlsrpt or self.seqtlsrpt:  # TLSRPT rules: dkimpy's own
            return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from None
        body = canonical_body(self.body, policy.body_algorithm.name.decode())
        if b"l" in sig:
            body = body[: int(sig[b"l"])]
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (TypeError, binascii.Error) as exc:
            raise dkim.MessageFormatError(str(exc)) from None
        hasher = dkim.HASH_ALGORITHMS[sig[b"a"]]
        if hasher(body).digest() != expected:
            raise dkim.ValidationError("body hash mismatch")
        if self.ktag != b"rsa":  # Ed25519: dkimpy (through PyNaCl), without the body again
            return super().verify_sig_process({k: v for k, v in sig.items() if k != b"bh"},
                                              include_headers, sig_header, dnsfunc)
        if b"from" in include_headers:  # as dkimpy: an added From field breaks the signature
            include_headers.append(b"from")
        h = hasher()
        self.signed_headers = dkim.hash_headers(h, policy, policy.canonicalize_headers(self.headers),
                                                include_headers, sig_header, sig)
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        ok = rsa_verify(self.pk, signature, h.digest(), sig[b"a"])
        if ok and self.keysize < self.minkey:
            raise dkim.KeyFormatError(f"public key too small: {self.keysize}")
        return ok


def _spf_domain(mail_from: str, helo: str) -> str:
    """The domain SPF checks: the envelope sender's, or the HELO name's for the null sender."""
    return mail_from.rpartition("@")[2] if mail_from else helo


def _spf(res: AuthResults, ip: str, helo: str, mail_from: str, timeout: float) -> bool:
    """Evaluate SPF into ``res``; False if pyspf raised (the result is then temperror)."""
    res.spf_domain = _spf_domain(mail_from, helo)
    try:
        result, *_ = spf.query(i=ip, s=mail_from or f"postmaster@{helo}", h=helo, timeout=timeout).check()
        res.spf = {"softfail": "softfail", "neutral": "neutral", "pass": "pass", "fail": "fail",
                   "none": "none", "temperror": "temperror", "permerror": "permerror"}.get(result, result)
    except Exception as exc:  # pyspf raises on odd input; never fail the delivery on it
        log.info("spf_check_error", error=str(exc))
        res.spf = "temperror"
        return False
    return True


# SPF results of evaluations answered wholly from the resolver's cache, by (ip, sender, helo):
# (result, the (name, qtype, answer) lookups it used). An evaluation is a function of its
# inputs and the DNS answers it saw, so while each of those is still the very answer in the
# resolver's cache (not expired, not replaced) the result stands; else it is evaluated again.
# Saves pyspf's evaluation (about 140 us of event-loop CPU per message, bench/RESULTS.md) for
# the senders that send again within their records' TTL.
_SPF_RESULTS: dict[tuple[str, str, str], tuple[str, list[tuple[str, str, object]]]] = {}
_SPF_RESULTS_MAX = 10_000


def _spf_remembered(resolver: dns.resolver.Resolver, key: tuple[str, str, str]) -> str | None:
    entry = _SPF_RESULTS.get(key)
    if entry is None:
        return None
    result, used = entry
    for name, qtype, answer in used:
        if cached_answer(resolver, name, qtype) is not answer:
            _SPF_RESULTS.pop(key, None)
            return None
    return result


def _check_sync(data: bytes, ip: str, helo: str, mail_from: str,
                resolver: dns.resolver.Resolver, res: AuthResults | None = None) -> AuthResults:
    """SPF (unless ``res`` has it already) and DKIM, with real DNS lookups."""
    if res is None:
        res = AuthResults()
        _spf(res, ip, helo, mail_from, resolver.lifetime)
    res.dkim = _dkim_results(data, _dkim_dnsfunc(resolver), resolver.lifetime)
    return res


def _dkim_results(data: bytes, dnsfunc, timeout: float) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    """(result, d=, s=) of each DKIM-Signature: "pass" (or "temperror") from the fast path
    (``dkimverify``) where it can tell, else dkimpy's verdict (:class:`_Verifier`). A key
    lookup that timed out is "temperror" (RFC 8601 §2.7.1), where dkimpy would say "fail"."""
    fast = Message.parse(data)
    if fast is not None:
        nsig = len(fast.signatures)
    else:
        header_end = data.find(b"\r\n\r\n")
        nsig = len(_SIG.findall(data[: header_end if header_end >= 0 else len(data)]))
    results: list[tuple[str, str, str]] = []
    d = None
    for idx in range(nsig):
        if fast is not None:
            try:
                found = fast.verify(idx, dnsfunc, timeout)
            except Exception:  # whatever it is, dkimpy's verification says what it means
                found = None
            if found is not None:
                results.append(found)
                continue
            cache_only = CacheOnly.current()
            if cache_only is not None and cache_only.missed:
                return results  # a key is not cached: the caller verifies again with lookups
        if d is None:
            try:
                d = _Verifier(data, timeout=timeout)
            except Exception as exc:  # dkimpy's DKIMException, or IndexError on a first line
                # that is a continuation: no signature can be checked, and the message is still
                # accepted (RFC 8601 permerror)
                log.info("dkim_header_unreadable", error=str(exc))
                return [("permerror", "", "")]
        results.append(_dkimpy_result(d, idx, dnsfunc))
    return results


def _dkimpy_result(d: _Verifier, idx: int, dnsfunc) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    timed_out = []

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            return dnsfunc(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            timed_out.append(name)
            raise

    d.signature_fields = {}  # not the previous signature's tags if this one's cannot be read
    try:
        ok = d.verify(idx=idx, dnsfunc=lookup)
        result = "pass" if ok else "temperror" if timed_out else "fail"
    except dkim.DnsTimeoutError:
        result = "temperror"
    except dkim.ValidationError:  # e.g. body hash mismatch: the signature does not verify
        result = "fail"
    except Exception:  # dkimpy's DKIMException, or what its parsers raise on odd input
        result = "permerror"
    sig = d.signature_fields or {}
    return (result, (sig.get(b"d") or b"").decode(errors="replace"),
            (sig.get(b"s") or b"").decode(errors="replace"))


def _has_signature(data: bytes) -> bool:
    header_end = data.find(b"\r\n\r\n")
    return _SIG.search(data, 0, header_end if header_end >= 0 else len(data)) is not None


def _spf_from_cache(res: AuthResults, ip: str, helo: str, mail_from: str,
                    resolver: dns.resolver.Resolver) -> bool:
    """SPF into ``res`` from the resolver's cache alone, a remembered result first; False when
    a record it needs is not cached (then nothing of this evaluation counts)."""
    key = (ip, mail_from, helo)
    remembered = _spf_remembered(resolver, key)
    if remembered is not None:
        res.spf, res.spf_domain = remembered, _spf_domain(mail_from, helo)
        return True
    with CacheOnly() as attempt:
        ok = _spf(res, ip, helo, mail_from, resolver.lifetime)
    if attempt.missed:
        return False
    if ok and attempt.used:
        if len(_SPF_RESULTS) >= _SPF_RESULTS_MAX:
            _SPF_RESULTS.clear()
        _SPF_RESULTS[key] = (res.spf, attempt.used)
    return True


async def check(data: bytes, ip: str, helo: str, mail_from: str,
                resolver: dns.resolver.Resolver) -> AuthResults:
    """SPF and DKIM results for one message.

    pyspf and dkimpy block on DNS, so they run in a thread. But an SPF evaluation whose
    records are all in the resolver's cache runs right here (:class:`CacheOnly`), saving the
    thread hand-off and the queries, and its result is remembered for as long as those
    records stay cached (``_SPF_RESULTS``). So does DKIM verification of a message up to
    VERIFY_IN_LOOP_MAX whose key records are all cached (0.3-0.5 ms, less than a thread
    hand-off); else it runs in the thread with real lookups.
    """
    if resolver.cache is not None:
        res = AuthResults()
        if _spf_from_cache(res, ip, helo, mail_from, resolver):
            if not _has_signature(data):
                return res
            if len(data) <= VERIFY_IN_LOOP_MAX:
                with CacheOnly() as attempt:
                    dkim_results = _dkim_results(data, _dkim_dnsfunc(resolver), resolver.lifetime)
                if not attempt.missed:
                    res.dkim = dkim_results
                    return res
            return await asyncio.to_thread(_check_sync, data, ip, helo, mail_from, resolver, res)
    return await asyncio.to_thread(_check_sync, data, ip, helo, mail_from, resolver)
