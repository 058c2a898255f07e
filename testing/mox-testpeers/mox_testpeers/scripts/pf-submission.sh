#!/bin/bash
# pf-submission.sh DIR PORT [TLSPORT]
# Private Postfix instance: STARTTLS submission smarthost on $LISTEN_ADDR:PORT (default 127.0.0.1;
# + implicit TLS on $LISTEN_ADDR:TLSPORT if given), Cyrus SASL against a private sasldb, every
# accepted message delivered to the Maildir DIR/mail/sink/. Run as root.
# Environment (all optional):
#   SERVER_KEY     PEM RSA key to use for the server certificate (default: generate one)
#   LISTEN_ADDR    listen address (default 127.0.0.1)
#   REALM          myhostname and SASL realm (default smarthost.test)
#   SASL_USER      user created in the sasldb (default alice; empty: none)
#   SASL_PASSWORD  its password (default secret-pw)
#   MECH_LIST      Cyrus SASL mech_list (default SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN)
# Start with `postfix -c DIR/conf start`, stop with `postfix -c DIR/conf stop`.
set -euo pipefail
T=$1; PORT=$2; TLSPORT=${3:-}
ADDR=${LISTEN_ADDR:-127.0.0.1}
REALM=${REALM:-smarthost.test}
SASL_USER=${SASL_USER-alice}
SASL_PASSWORD=${SASL_PASSWORD-secret-pw}
MECH_LIST=${MECH_LIST:-SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN}
mkdir -p "$T"/{conf/sasl,queue,data,mail,tls}
chmod 755 "$T"                  # smtpd runs as 'postfix', virtual(8) as nobody: both must traverse $T
chown postfix "$T/data"         # master.lock is created here as mail_owner
chown nobody:nogroup "$T/mail"  # virtual(8) creates the Maildir as virtual_uid_maps

# throwaway CA + server certificate (SAN localhost, 127.0.0.1 and the listen address)
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
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr 2>/dev/null
  SAN="DNS:localhost,DNS:$REALM,IP:127.0.0.1"
  [ "$ADDR" != 127.0.0.1 ] && SAN="$SAN,IP:$ADDR"
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$SAN" > ext.cnf
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile ext.cnf -out server.crt 2>/dev/null )

cat > "$T/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $T/queue
data_directory = $T/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = pf-sub-$PORT
maillog_file = $T/maillog
maillog_file_prefixes = $T
myhostname = $REALM
mydomain = $REALM
myorigin = $REALM
mydestination =
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
# every recipient domain is local: all accepted mail lands in $T/mail/sink/ (Maildir)
virtual_mailbox_domains = static:all
virtual_mailbox_maps = static:sink/
virtual_mailbox_base = $T/mail
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_tls_cert_file = $T/tls/server.crt
smtpd_tls_key_file = $T/tls/server.key
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
# upstream Postfix reads \$cyrus_sasl_config_path/smtpd.conf; Debian's build ignores it and
# reads \$config_directory/sasl/smtpd.conf -- same directory here, so both work
cyrus_sasl_config_path = $T/conf/sasl
smtpd_sasl_local_domain = $REALM
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
CF

cat > "$T/conf/sasl/smtpd.conf" <<SC
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: $T/conf/sasl/sasldb2
mech_list: $MECH_LIST
SC

# chroot column (5th) is "n" everywhere: no copies of files into the queue directory needed
cat > "$T/conf/master.cf" <<MC
$ADDR:$PORT inet n - n - - smtpd
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
proxywrite unix - - n - 1 proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
MC
if [ -n "$TLSPORT" ]; then
  echo "$ADDR:$TLSPORT inet n - n - - smtpd -o smtpd_tls_wrappermode=yes" >> "$T/conf/master.cf"
fi

# private sasldb; the realm must equal smtpd_sasl_local_domain. The sasldb keeps the password
# itself (userPassword): SCRAM-SHA-*, CRAM-MD5, PLAIN and LOGIN all work from it.
if [ -n "$SASL_USER" ]; then
  printf '%s\n' "$SASL_PASSWORD" | saslpasswd2 -p -f "$T/conf/sasl/sasldb2" -u "$REALM" -c "$SASL_USER"
  chown root:postfix "$T/conf/sasl/sasldb2"
  chmod 640 "$T/conf/sasl/sasldb2"
fi

# Postfix waits (5 x 300 ms) while main.cf is younger than ~2 s; backdating makes "start" take 0.3 s
touch -d '-1 min' "$T/conf/main.cf" "$T/conf/master.cf"
