"""Milters: the MTA side of the Sendmail milter protocol, version 6.

Modules, lowest first:

* :mod:`.codec`: packets to typed events and back, both sides (sans-IO);
* :mod:`.protocol`: negotiation and one milter conversation's state, the
  :class:`Verdict` each stage gets (sans-IO);
* :mod:`.client`: :class:`Milter`, the asyncio driver with the timeouts and
  the default action;
* :mod:`.chain`: :class:`MilterChain`, the configured milters in order, and
  :func:`apply_header_changes`;
* :mod:`.config`: :class:`MilterConfig`, one ``[[milters]]`` table.

The session makes one :class:`MilterChain` per SMTP connection from the
configured :class:`MilterConfig` list (none for a channel with
``checks = false``) and awaits it at each stage; see :mod:`.chain` for what
to do with each verdict and :mod:`.client` for the call order.

This package imports none of them: the configuration reads ``[[milters]]``
(:mod:`.config`, the standard library only) in every program, and only a
program that talks to milters loads the client.
"""
