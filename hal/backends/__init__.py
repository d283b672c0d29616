"""What the runtime drives: NVRAM (file, DAX), disks (file, and the test-only volatile and faulty
ones), the flush thread, link transports (socket, serial) and their framers, the clock, the pair key."""
