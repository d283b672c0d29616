"""The deterministic simulator: ha mode (ha.py), replica mode's bitmap (replica.py) and log
(log.py) variants, their rigs, and the simulated disks, NVRAM, link and clock."""
