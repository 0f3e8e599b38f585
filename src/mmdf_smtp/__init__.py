"""mmdf-smtp: the SMTP inbound channel of the MMDF mail system, re-made."""

__version__ = "0.1.0"
