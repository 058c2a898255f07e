"""The SMTP server: an aiosmtpd protocol subclass (:mod:`.protocol`) that turns the wire protocol
into calls on a policy object (aiosmtpd ``handle_*`` hooks). Policy lives elsewhere."""
