"""Replica mode, bitmap variant (claims 3): a primary copies each write to a secondary with its
own disks, both record un-destaged ranges in NVRAM bitmaps, and a returning peer is resynced
from them.

controller.py (ReplicaController: the write path, the session table, promotion, split brain),
destage.py (clearing SENT and RECEIVED as data reaches the disks), resync.py (the quick resync
from the bitmaps), record.py (the bitmaps and the generation header in NVRAM), generations.py
(which side's data is newer). The NVRAM-log variant is firmware/logship/.
"""
