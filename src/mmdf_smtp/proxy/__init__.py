"""The PROXY protocol (HAProxy's, versions 1 and 2): the header a load
balancer sends before the client's octets, read without I/O."""

from .reader import (
    NEED_MORE,
    V1_MAX_LENGTH,
    V2_DEFAULT_MAX_LENGTH,
    Command,
    Endpoint,
    Family,
    NeedMore,
    ProxyError,
    ProxyHeader,
    ProxyReader,
    encode_v1,
    encode_v2,
)

__all__ = [
    "NEED_MORE",
    "V1_MAX_LENGTH",
    "V2_DEFAULT_MAX_LENGTH",
    "Command",
    "Endpoint",
    "Family",
    "NeedMore",
    "ProxyError",
    "ProxyHeader",
    "ProxyReader",
    "encode_v1",
    "encode_v2",
]
