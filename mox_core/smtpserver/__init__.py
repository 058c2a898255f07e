"""The SMTP server: incoming SMTP, submission (STARTTLS) and submissions (implicit TLS).

* :mod:`.protocol`: :class:`~.protocol.MoxSMTP`, aiosmtpd's protocol class made lean: the
  connection, the command loop, EHLO and STARTTLS; its other commands are in :mod:`.mailrcpt`
  (MAIL, RCPT), :mod:`.datareader` (DATA) and :mod:`.auth` (AUTH).
* :mod:`.handler`: the policy behind the protocol (aiosmtpd ``handle_*`` hooks): which
  recipients are ours, who may send as whom, delivery into Maildirs and the outgoing queue.
  :mod:`.fromheader` is the fast path of its From check.
* :mod:`.interfaces`: what the handler and the listeners need from the Maildir store, the
  queue, the rate limits and the credentials, as Protocols.
* :mod:`.listen`: the listeners of ``mox.toml``.

The reply texts are in :mod:`mox_core.smtp.codes`.
"""
