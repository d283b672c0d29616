"""The runtime: one controller process. The loop that carries out the firmware's actions
(through hal/interpret.py, shared with the simulator and the rigs), its control socket,
metrics, configuration and provisioning."""
