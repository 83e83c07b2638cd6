"""exo classic's `exo.helpers`: its helper names at their classic path, so callers written against it keep working.

Each name lives in the module of its concept; new code imports from there:

- `exo.settings`: `DEBUG`, `DEBUG_DISCOVERY`, `VERSION`
- `exo.callbacks`: `AsyncCallback`, `AsyncCallbackSystem`
- `exo.prefix_dict`: `PrefixDict`
- `exo.node_id`: `get_or_create_node_id`, `is_valid_uuid`
- `exo.networking.ports`: `find_available_port`
- `exo.networking.interfaces`: `get_all_ip_addresses_and_interfaces`, `get_interface_priority_and_type`,
  `get_macos_interface_type`, `subprocess_pool`
- `exo.system`: `get_system_info`, `is_frozen`, `get_exo_home`, `get_exo_images_dir`
- `exo.terminal`: `exo_text`, `print_exo`, `print_yellow_exo`, `terminal_link`, `pretty_print_bytes`,
  `pretty_print_bytes_per_second`
- `exo.shutdown`: `shutdown`
"""

from exo.callbacks import AsyncCallback, AsyncCallbackSystem
from exo.networking.interfaces import (
    get_all_ip_addresses_and_interfaces,
    get_interface_priority_and_type,
    get_macos_interface_type,
    subprocess_pool,
)
from exo.networking.ports import find_available_port
from exo.node_id import get_or_create_node_id, is_valid_uuid
from exo.prefix_dict import PrefixDict
from exo.settings import DEBUG, DEBUG_DISCOVERY, VERSION
from exo.shutdown import shutdown
from exo.system import get_exo_home, get_exo_images_dir, get_system_info, is_frozen
from exo.terminal import (
    exo_text,
    pretty_print_bytes,
    pretty_print_bytes_per_second,
    print_exo,
    print_yellow_exo,
    terminal_link,
)

__all__ = [
    "DEBUG",
    "DEBUG_DISCOVERY",
    "VERSION",
    "AsyncCallback",
    "AsyncCallbackSystem",
    "PrefixDict",
    "exo_text",
    "find_available_port",
    "get_all_ip_addresses_and_interfaces",
    "get_exo_home",
    "get_exo_images_dir",
    "get_interface_priority_and_type",
    "get_macos_interface_type",
    "get_or_create_node_id",
    "get_system_info",
    "is_frozen",
    "is_valid_uuid",
    "pretty_print_bytes",
    "pretty_print_bytes_per_second",
    "print_exo",
    "print_yellow_exo",
    "shutdown",
    "subprocess_pool",
    "terminal_link",
]
