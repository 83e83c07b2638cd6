"""The cluster: device capabilities, the peer graph and partitioning."""
