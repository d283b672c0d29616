"""ha mode's ownership of a LUN between the two controllers of a pair, through the reservation
records on the shared disks (claims 5).

controller.py (HaOwnership, the part that answers the questions of firmware/owners.py, and
HaController: the shared controller with that part), ownership.py (the states, the transition table, what a
controller keeps per LUN),
fencing.py (the argument, leases, the owner alone), takeover.py (watching, claiming,
replaying), handover.py (moving a LUN while linked: the CLI, failback, balancing). The
write path, the mirror partner side and destage they drive are shared parts at the top of
firmware/.
"""
