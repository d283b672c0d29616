"""The host port: the NBD protocol engine (handshake, options, structured replies, block status)
and NBD over TLS."""
