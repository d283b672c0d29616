"""Hardware abstraction layer: everything around the firmware, by room.

- `hal.backends`: what the runtime drives (NVRAM, disks, the flush thread, link transports
  and framers, the clock, the pair key), with the small ABCs in `hal.backends.interfaces`.
- `hal.host`: the host port (NBD, and NBD over TLS).
- `hal.runtime`: one controller process: the loop carrying out the firmware's actions, its
  control socket, metrics and configuration.
- `hal.sim`: the deterministic simulator of every mode, and its in-memory rigs.
- `hal.cli`: the `twincache` command line; `hal.tools`: the local pair driver, the demo,
  benchmarks and invoke task bodies.
- `hal.interpret`: the one interpreter of the firmware's actions, shared by the runtime, the
  simulator and the rigs.
"""
