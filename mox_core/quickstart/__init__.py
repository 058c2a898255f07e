"""``mox quickstart``: the production sibling of ``mox localserve``. It writes a commented
``mox.toml`` and ``domains.toml`` for one domain and account, DKIM keys, the passwords, and
prints the DNS records and the next steps (:mod:`mox_core.quickstart.command`)."""
