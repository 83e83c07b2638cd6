"""Draws the live topology TUI with a two-node cluster and a streaming answer, for the tmux smoke test."""

import time

from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.topology.partitioning_strategy import Partition
from exo.topology.topology import Topology
from exo.viz.topology_viz import TopologyViz

topology = Topology()
topology.update_node("node-a", DeviceCapabilities("Linux Box (EPYC)", "EPYC", 32768, DeviceFlops(1.5, 3.0, 6.0)))
topology.update_node("node-b", DeviceCapabilities("MacBook Pro", "Apple M3", 16384, DeviceFlops(4.0, 8.0, 16.0)))
viz = TopologyViz(["http://127.0.0.1:52415/v1/chat/completions"], ["http://127.0.0.1:52415"])
viz.update_visualization(topology, [Partition("node-a", 0.0, 0.5), Partition("node-b", 0.5, 1.0)], "node-a")
viz.update_prompt("request-1", "Tell me about rings")
output = ""
for word in "tokens arrive one by one and the panel follows them to the end".split():
    output += word + " "
    viz.update_prompt_output("request-1", output)
    time.sleep(0.05)
time.sleep(60)
