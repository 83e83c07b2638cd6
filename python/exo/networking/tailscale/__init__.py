"""Discovery through Tailscale's API (exo classic's `exo.networking.tailscale`)."""
