"""UDP broadcast discovery (exo classic's `exo.networking.udp`)."""
