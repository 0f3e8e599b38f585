"""I/O shells around the protocol core: thin drivers that move octets.

:mod:`.blocking` serves one session on a pair of file descriptors (stdin and
stdout of ``smtpsrvr``); the asyncio daemon drives the same core and the
same :class:`mmdf_smtp.session.Session`.
"""
