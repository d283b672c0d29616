"""Static ownership, for the test rigs only: LUN n belongs to controller n % 2 for good.

No reservation records, no leases, no takeover: a pair whose disks are not shared
(fixtures/mempair.py's default, `run_seed(fencing=False)`) still runs the whole write
path, the mirror, its resync and destage. Production's ha controller moves ownership
(firmware/ha/controller.py); this one answers the same questions (firmware/owners.py)
from a fixed map.
"""
from firmware.controller import Controller
from firmware.ha.controller import HaController
from firmware.owners import FixedOwnership


class StaticOwnership(FixedOwnership):
    def __init__(self, ctrl):
        super().__init__(ctrl)
        self.owner = {lun: lun % 2 for lun in range(len(ctrl.params.lun_sizes))}

    def owns(self, lun) -> bool:
        return self.owner.get(lun) == self.ctrl.id


class StaticController(Controller):
    def __init__(self, params, nv, key: bytes, now_ms: int = 0):
        super().__init__(params, nv, key, now_ms)
        self.ownership = StaticOwnership(self)


def controller_class(fencing: bool):
    """The ha controller with ownership that moves (fencing), or the static one."""
    return HaController if fencing else StaticController
