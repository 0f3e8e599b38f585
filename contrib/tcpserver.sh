#!/bin/sh
# ucspi-tcp: tcpserver sets TCPREMOTEIP, which smtpsrvr reads; -c 4 is the
# seed's maxconnects.
exec tcpserver -v -c 4 -u "$(id -u mmdf)" -g "$(id -g mmdf)" 0 25 \
    /usr/local/bin/smtpsrvr -c /etc/mmdf/mmdf.toml - - local,smtp
