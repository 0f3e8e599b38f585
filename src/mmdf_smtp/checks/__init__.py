"""Built-in checks at SMTP time: DNS blocklists, SPF, DKIM, ARC, DMARC, and their results field.

Modules, lowest first:

* :mod:`.config`: :class:`~.config.AuthConfig` and
  :class:`~.config.DnsblConfig`, the ``[auth]`` and ``[dnsbl]`` tables
  (the standard library only: every program reads the configuration);
* :mod:`.verdicts`: what each check says, and :class:`~.verdicts.Refusal`;
* :mod:`.dns`: the one asynchronous :class:`~.dns.Resolver` of every look-up;
* :mod:`.dnsbl`, :mod:`.spf` (pyspf), :mod:`.dkim` (dkimpy, DKIM and ARC),
  :mod:`.dmarc`: the checks;
* :mod:`.results`: the Authentication-Results field (RFC 8601);
* :mod:`.gate`: :class:`~.gate.Checks`, the one place the session asks,
  and the DKIM verification processes.

This package imports none of them: a program that does not check mail
(submit, checkque, deliver) reads ``[auth]`` and ``[dnsbl]`` without
loading dkimpy, pyspf or the asynchronous resolver.
"""
