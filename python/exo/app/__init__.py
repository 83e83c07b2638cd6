"""The node application that `exo` (`python -m exo.main`) runs, one concept per module.

- `app`: `App`, which builds a node, its API and views in exo classic's order and runs the chosen mode.
- `engines`: which inference engine to run (`--inference-engine`, `EXO_ENGINE`, the build's default).
- `cli_error`: `CliError`, a problem with the command line or environment, reported without a traceback.
- `status`: reading the opaque statuses nodes broadcast.
- `tui_feed`: feeds prompts, streamed output and the cluster's state into the topology TUI.
- `preloader`: fetches and loads this node's shard as soon as a prompt starts elsewhere in the ring.
- `progress`: broadcasts this node's download progress to its peers, throttled.

`exo.main` holds the argument parser and `run`/`main`, and re-exports the names classic's users import from it.
"""
