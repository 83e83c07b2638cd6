"""Discovery through Tailscale's devices API and posture attributes, implemented in Rust.

`TailscaleDiscovery(node_id, node_port, create_peer_handle, discovery_interval=5, discovery_timeout=30,
update_interval=15, device_capabilities=None, tailscale_api_key=None, tailnet=None, allowed_node_ids=None,
*, api_base=None, device_id=None)`. The key and tailnet default to `TAILSCALE_API_KEY` and
`TAILSCALE_TAILNET` (else `-`, the key's tailnet); `api_base` (or `EXO_TAILSCALE_API_BASE`) replaces
https://api.tailscale.com; `device_id` names this machine's device instead of asking `tailscale status`.
"""

from exo._core import TailscaleDiscovery

__all__ = ["TailscaleDiscovery"]
