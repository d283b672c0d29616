"""twincache firmware: the controller logic, deterministic and free of I/O.

Everything in this package takes events and returns actions. It imports no
socket, asyncio, time, random, os, threading or libvirt (tests/test_boundary.py
enforces it). NVRAM is handed in as a writable buffer; making a range durable
is an action.
"""
