"""UDP broadcast discovery with exo classic's wire format and constructor, implemented in Rust.

`UDPDiscovery(node_id, node_port, listen_port, broadcast_port, create_peer_handle, broadcast_interval=2.5,
discovery_timeout=30, device_capabilities=None, allowed_node_ids=None, allowed_interface_types=None)`;
`allowed_interface_types` also limits the interfaces this node announces itself on.
"""

from exo._core import UDPDiscovery

__all__ = ["UDPDiscovery"]
