"""The DNS records a domain needs for mail with this server, and a check of what is published.

* :func:`suggested_records` (``mox dnsrecords DOMAIN``, ``mox quickstart``): MX, SPF, DKIM,
  DMARC, MTA-STS, TLSRPT, autoconfig and SRV records, reverse DNS, from the config.
* :func:`check_domain` (``mox dnscheck DOMAIN``, the admin pages): looks them all up at once,
  with a timeout per lookup and an overall one, and says per check ``pass``, ``warning`` or
  ``failure``, with what to change. Structured results (:class:`DNSCheck`), for the CLI's
  table and for web pages alike.
"""

from mox_core.dnscheck.base import CheckResult, DNSCheck, Status, format_table
from mox_core.dnscheck.records import Record, format_zone, suggested_records
from mox_core.dnscheck.run import check_domain

__all__ = ["CheckResult", "DNSCheck", "Record", "Status", "check_domain", "format_table", "format_zone", "suggested_records"]
