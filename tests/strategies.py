"""Hypothesis strategies more than one test file draws from."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

# Any IPv4 or IPv6 network, of any prefix length.
ip_networks = st.one_of(
    st.builds(
        lambda n, p: ipaddress.ip_network((n, p), strict=False),
        st.integers(min_value=0, max_value=2**32 - 1),
        st.integers(min_value=0, max_value=32),
    ),
    st.builds(
        lambda n, p: ipaddress.ip_network((n, p), strict=False),
        st.integers(min_value=0, max_value=2**128 - 1),
        st.integers(min_value=0, max_value=128),
    ),
)
