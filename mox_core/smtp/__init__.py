"""Pure SMTP helpers: reply codes, address and domain parsing. No I/O here."""
