#!/bin/bash
# pf-mx.sh DIR ADDR DOMAIN [PORT]      e.g.  pf-mx.sh /tmp/mx1 127.0.0.2 dest.test
# Private Postfix instance: plain MX on ADDR:PORT (default 25) for DOMAIN (any local part) into
# the Maildir DIR/mail/inbox/; STARTTLS offered, not required; relaying refused. Run as root
# (port 25). Optional environment: SERVER_KEY, a PEM RSA key for the server certificate
# (default: generate one). Start with `postfix -c DIR/conf start`, stop with `postfix -c DIR/conf stop`.
set -euo pipefail
T=$1; ADDR=$2; DOMAIN=$3; PORT=${4:-25}
mkdir -p "$T"/{conf,queue,data,mail,tls}
chmod 755 "$T"
chown postfix "$T/data"
chown nobody:nogroup "$T/mail"
( cd "$T/tls"
  # per-instance CA (EC P-256: instant); the RSA 2048 server key may come from $SERVER_KEY,
  # a key the caller generated once and reuses (RSA key generation costs up to 0.5 s)
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj "/CN=Test CA" \
    -keyout ca.key -out ca.crt \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  if [ -n "${SERVER_KEY:-}" ] && [ -f "$SERVER_KEY" ]; then
    install -m 600 "$SERVER_KEY" server.key
  else
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key 2>/dev/null
  fi
  openssl req -new -key server.key -subj "/CN=mx.$DOMAIN" -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:mx.%s,DNS:localhost,IP:%s\nextendedKeyUsage=serverAuth\n' "$DOMAIN" "$ADDR" > ext.cnf
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile ext.cnf -out server.crt 2>/dev/null )

cat > "$T/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $T/queue
data_directory = $T/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = pf-mx-$ADDR-$PORT
maillog_file = $T/maillog
maillog_file_prefixes = $T
myhostname = mx.$DOMAIN
smtpd_banner = \$myhostname ESMTP test-mx
mydestination =
# master.cf binds $ADDR itself; inet_interfaces may only list addresses configured on an
# interface, and 127.0.0.2 is routed to lo but not configured on it
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks =
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
default_transport = error:no outbound mail from test instance
relay_transport = error:no outbound mail from test instance
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = $DOMAIN
virtual_mailbox_maps = static:inbox/
virtual_mailbox_base = $T/mail
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions =
smtpd_tls_cert_file = $T/tls/server.crt
smtpd_tls_key_file = $T/tls/server.key
smtpd_tls_security_level = may
CF

cat > "$T/conf/master.cf" <<MC
$ADDR:$PORT  inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
MC

# Postfix waits (5 x 300 ms) while main.cf is younger than ~2 s; backdating makes "start" take 0.3 s
touch -d '-1 min' "$T/conf/main.cf" "$T/conf/master.cf"
