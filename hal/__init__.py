"""Hardware abstraction layer: the interfaces and their backends, and the runtime.

`hal.interfaces` holds the small ABCs; each backend lives in a file of its own
(nvram_file, nvram_dax, disk_file, link_socket, link_serial, clock, the sim_*
backends). `hal.runtime` runs the firmware: it carries out the actions the
firmware returns and feeds the results back as events.
"""
