"""Dev boards: firmware bundles, flashing over serial and USB DFU, the board agent."""
