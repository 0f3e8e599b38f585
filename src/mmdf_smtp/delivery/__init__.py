"""Delivery: what ``deliver`` does with a queued message.

:mod:`.runner` walks the queue; local recipients go into Maildirs
(:mod:`.maildir`), others to the next hop over SMTP or LMTP
(:mod:`.nexthop`); permanent failures come back to the sender as a
delivery status notification (:mod:`.dsn`).
"""
