//! This host's IPv4 interfaces and exo classic's ranking of them: the interface a message
//! went out on tells peers how good the link is (Thunderbolt beats Ethernet beats Wi-Fi).

use std::net::Ipv4Addr;

/// The kind of link an interface is, as exo classic names it in discovery messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InterfaceType {
    /// Docker, bridge, veth and CNI interfaces.
    ContainerVirtual,
    /// The loopback interface.
    Loopback,
    /// Thunderbolt networking.
    Thunderbolt,
    /// Wired Ethernet.
    Ethernet,
    /// Wireless.
    WiFi,
    /// Tunnels and VPNs.
    ExternalVirtual,
    /// Anything not recognised.
    Other,
}

impl InterfaceType {
    /// Classic's name for the type, as sent in `interface_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ContainerVirtual => "Container Virtual",
            Self::Loopback => "Loopback",
            Self::Thunderbolt => "Thunderbolt",
            Self::Ethernet => "Ethernet",
            Self::WiFi => "WiFi",
            Self::ExternalVirtual => "External Virtual",
            Self::Other => "Other",
        }
    }

    /// Classic's priority; a peer seen on several interfaces is kept on the highest.
    pub fn priority(self) -> i64 {
        match self {
            Self::ContainerVirtual => 7,
            Self::Loopback => 6,
            Self::Thunderbolt => 5,
            Self::Ethernet => 4,
            Self::WiFi => 3,
            Self::Other => 2,
            Self::ExternalVirtual => 1,
        }
    }

    /// The type of an interface judged by its name, by classic's rules for non-macOS hosts.
    pub fn from_name(name: &str) -> Self {
        const CONTAINER: [&str; 7] = ["docker", "br-", "veth", "cni", "flannel", "calico", "weave"];
        const TUNNEL: [&str; 8] = ["tun", "tap", "vtun", "utun", "gif", "stf", "awdl", "llw"];
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
        if starts(&CONTAINER) || name.contains("bridge") {
            Self::ContainerVirtual
        } else if name.starts_with("lo") {
            Self::Loopback
        } else if starts(&["tb", "nx", "ten"]) {
            Self::Thunderbolt
        } else if starts(&["eth", "en"]) && !starts(&["en0", "en1"]) {
            Self::Ethernet
        } else if starts(&["wlan", "wifi", "wl"]) || name == "en0" || name == "en1" {
            Self::WiFi
        } else if starts(&TUNNEL) {
            Self::ExternalVirtual
        } else {
            Self::Other
        }
    }
}

/// `(priority, type name)` of an interface, as classic's `get_interface_priority_and_type`.
pub fn interface_priority_and_type(name: &str) -> (i64, &'static str) {
    let kind = InterfaceType::from_name(name);
    (kind.priority(), kind.as_str())
}

/// One IPv4 address of this host and the interface it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface {
    /// Interface name (`eth0`, `lo`, ...).
    pub name: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// The subnet mask.
    pub netmask: Ipv4Addr,
}

impl NetworkInterface {
    /// The interface's type, judged by its name (or its loopback address).
    pub fn kind(&self) -> InterfaceType {
        if self.ip.is_loopback() {
            return InterfaceType::Loopback;
        }
        InterfaceType::from_name(&self.name)
    }

    /// Where a presence message from this address goes: the subnet's broadcast address and,
    /// off loopback, 255.255.255.255. On Linux loopback the subnet broadcast (127.255.255.255)
    /// reaches every listener of the port, while 255.255.255.255 would follow the default
    /// route off the host, so loopback sends only the former.
    pub fn broadcast_targets(&self) -> Vec<Ipv4Addr> {
        let mut targets = Vec::with_capacity(2);
        let host_bits = !u32::from(self.netmask);
        if host_bits > 1 {
            targets.push(Ipv4Addr::from(u32::from(self.ip) | host_bits));
        }
        if !self.ip.is_loopback() && !targets.contains(&Ipv4Addr::BROADCAST) {
            targets.push(Ipv4Addr::BROADCAST);
        }
        targets
    }
}

/// This host's IPv4 addresses, deduplicated, skipping `0.0.*`; just `127.0.0.1` on `lo` when
/// none can be listed (as classic falls back to localhost).
pub fn local_ipv4_interfaces() -> Vec<NetworkInterface> {
    let listed = match if_addrs::get_if_addrs() {
        Ok(listed) => listed,
        Err(error) => {
            log::debug!("cannot list network interfaces: {error}");
            Vec::new()
        }
    };
    let mut interfaces: Vec<NetworkInterface> = Vec::new();
    for interface in listed {
        let if_addrs::IfAddr::V4(v4) = interface.addr else { continue };
        if v4.ip.octets()[..2] == [0, 0] {
            continue;
        }
        let found = NetworkInterface { name: interface.name, ip: v4.ip, netmask: v4.netmask };
        if !interfaces.contains(&found) {
            interfaces.push(found);
        }
    }
    if interfaces.is_empty() {
        interfaces.push(NetworkInterface {
            name: "lo".into(),
            ip: Ipv4Addr::LOCALHOST,
            netmask: Ipv4Addr::new(255, 0, 0, 0),
        });
    }
    interfaces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_classic_types_and_priorities() {
        let cases = [
            ("docker0", 7, "Container Virtual"),
            ("br-1a2b", 7, "Container Virtual"),
            ("veth12", 7, "Container Virtual"),
            ("virbridge0", 7, "Container Virtual"),
            ("lo", 6, "Loopback"),
            ("lo0", 6, "Loopback"),
            ("tb0", 5, "Thunderbolt"),
            ("eth0", 4, "Ethernet"),
            ("enp3s0", 4, "Ethernet"),
            ("en2", 4, "Ethernet"),
            ("en0", 3, "WiFi"),
            ("en1", 3, "WiFi"),
            ("wlan0", 3, "WiFi"),
            ("wlp2s0", 3, "WiFi"),
            ("tun0", 1, "External Virtual"),
            ("utun3", 1, "External Virtual"),
            ("tailscale0", 2, "Other"),
        ];
        for (name, priority, kind) in cases {
            assert_eq!(interface_priority_and_type(name), (priority, kind), "{name}");
        }
    }

    #[test]
    fn broadcast_targets_follow_the_netmask() {
        let lan = NetworkInterface {
            name: "eth0".into(),
            ip: Ipv4Addr::new(192, 168, 1, 7),
            netmask: Ipv4Addr::new(255, 255, 240, 0),
        };
        assert_eq!(lan.broadcast_targets(), [Ipv4Addr::new(192, 168, 15, 255), Ipv4Addr::BROADCAST]);
        let lo = NetworkInterface {
            name: "lo".into(),
            ip: Ipv4Addr::LOCALHOST,
            netmask: Ipv4Addr::new(255, 0, 0, 0),
        };
        assert_eq!(lo.broadcast_targets(), [Ipv4Addr::new(127, 255, 255, 255)]);
        assert_eq!(lo.kind(), InterfaceType::Loopback);
        let point_to_point = NetworkInterface {
            name: "tailscale0".into(),
            ip: Ipv4Addr::new(100, 64, 0, 3),
            netmask: Ipv4Addr::new(255, 255, 255, 255),
        };
        assert_eq!(point_to_point.broadcast_targets(), [Ipv4Addr::BROADCAST]);
    }

    #[test]
    fn this_host_has_a_loopback_address() {
        let interfaces = local_ipv4_interfaces();
        assert!(interfaces
            .iter()
            .any(|i| i.ip == Ipv4Addr::LOCALHOST && i.kind() == InterfaceType::Loopback));
    }
}
