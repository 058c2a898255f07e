"""Reverse-proxy configurations for ``mox quickstart --existing-webserver``: what nginx or
Caddy, already serving 80 and 443, forwards to mox on loopback: the MTA-STS policy
(``mta-sts.<domain>``), autoconfig and autodiscover (``autoconfig.<domain>``), and the
account pages (``<hostname>/account/``). The Host header is passed on (mox routes by it), and
the client's address in X-Forwarded-For (the listener has ``forwarded = true``).
"""

from __future__ import annotations

from mox_core.quickstart.templates import PROXIED_PORT, Setup

__all__ = ["caddy_config", "nginx_config"]

_PATHS = ("/.well-known/mta-sts.txt", "/mail/config-v1.1.xml", "/autodiscover/autodiscover.xml")


def _nginx_proxy(indent: str) -> str:
    return "\n".join(indent + line for line in (
        f"proxy_pass http://127.0.0.1:{PROXIED_PORT};",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
    ))


def nginx_config(s: Setup) -> str:
    """Server blocks for nginx's ``http`` context (e.g. /etc/nginx/sites-enabled/mox)."""
    d, host = s.domain, s.hostname
    locations = "\n".join(f"    location = {p} {{\n{_nginx_proxy(' ' * 8)}\n    }}" for p in _PATHS)
    return f"""# nginx: forward MTA-STS, autoconfig and the account pages to mox (written by mox quickstart).
# Put it in the http context, e.g. /etc/nginx/sites-enabled/mox, then: nginx -t && systemctl reload nginx
# The certificate must cover {host}, mta-sts.{d} and autoconfig.{d}, e.g.
#   certbot certonly --webroot -w /var/www/html -d {host} -d mta-sts.{d} -d autoconfig.{d}
# mox's SMTP and submission use the same files (mox.toml, [listeners.public.tls]).

server {{
    listen 443 ssl;
    listen [::]:443 ssl;
    server_name mta-sts.{d} autoconfig.{d};
    ssl_certificate {s.cert};
    ssl_certificate_key {s.key};

{locations}
    location / {{
        return 404;
    }}
}}

server {{
    listen 443 ssl;
    listen [::]:443 ssl;
    server_name {host};
    ssl_certificate {s.cert};
    ssl_certificate_key {s.key};

    location /account/ {{
{_nginx_proxy(' ' * 8)}
    }}
    location = /account {{
        return 301 /account/;
    }}
}}

# Thunderbird also asks for autoconfig over plain HTTP.
server {{
    listen 80;
    listen [::]:80;
    server_name autoconfig.{d};

    location = /mail/config-v1.1.xml {{
{_nginx_proxy(' ' * 8)}
    }}
    location / {{
        return 301 https://$host$request_uri;
    }}
}}
"""


def caddy_config(s: Setup) -> str:
    """Site blocks for a Caddyfile. Caddy gets certificates for these names itself; mox's
    SMTP can use Caddy's for the host name (see the comment)."""
    d, host = s.domain, s.hostname
    return f"""# Caddy: forward MTA-STS, autoconfig and the account pages to mox (written by mox quickstart).
# Add to your Caddyfile, then: caddy validate --config /etc/caddy/Caddyfile && systemctl reload caddy
# Caddy obtains certificates for these names by itself; point mox's cert_file and key_file
# (mox.toml, [listeners.public.tls]) at Caddy's files for {host}, e.g. under
# /var/lib/caddy/.local/share/caddy/certificates/acme-v02.api.letsencrypt.org-directory/{host}/

mta-sts.{d}, autoconfig.{d} {{
	@mox path {" ".join(_PATHS)}
	handle @mox {{
		reverse_proxy 127.0.0.1:{PROXIED_PORT}
	}}
	handle {{
		respond 404
	}}
}}

{host} {{
	handle /account/* {{
		reverse_proxy 127.0.0.1:{PROXIED_PORT}
	}}
	redir /account /account/
	handle {{
		respond 404
	}}
}}
"""
