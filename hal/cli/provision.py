"""`twincache provision --config FILE.toml [--force]`: a controller's pair key and disk labels.

Run once on a new controller (a dev board before its first flash, a host
before `controller run`): it creates the pair key if there is none and labels
every disk of the config. Running it again changes nothing and says so. A
disk that holds data (another pair's label, or non-zero bytes) is refused,
and then nothing at all is written, unless `--force` (hal/runtime/provision.py).
"""
from __future__ import annotations

from hal.cli.errors import CommandFailed, UsageError

ICONS = {"create": "created", "label": "labelled", "relabel": "RELABELLED", "keep": "unchanged",
         "refuse": "REFUSED"}


def register(sub):
    p = sub.add_parser("provision", help="create the pair key and label the disks of one controller")
    p.add_argument("--config", required=True, help="the controller config (TOML)")
    p.add_argument("--force", action="store_true", help="relabel disks that hold data (their data is lost)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, write nothing")
    p.set_defaults(func=cmd_provision)


def cmd_provision(args):
    import hal.runtime.config as C
    import hal.runtime.provision as provision
    from hal.backends.interfaces import HalError
    try:
        cfg = C.load(args.config)
    except C.ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        steps = provision.plan(cfg, force=args.force)
    except (HalError, OSError) as exc:
        raise CommandFailed(f"provision: {exc}") from None
    for step in steps:
        print(f"{step.what:6} {ICONS[step.action]:10} {step.path}: {step.reason}")
    refused = [s for s in steps if s.action == "refuse"]
    if refused:
        raise CommandFailed(f"provision: refused {', '.join(s.what for s in refused)}; nothing was written")
    changes = [s for s in steps if s.changes]
    if not changes:
        print(f"nothing to do: controller {cfg.name} is already provisioned")
        return 0
    if args.dry_run:
        print(f"dry run: {len(changes)} change(s) not made")
        return 0
    try:
        provision.apply(steps, cfg)
    except (HalError, OSError) as exc:
        raise CommandFailed(f"provision: {exc}") from None
    print(f"provisioned controller {cfg.name}: {len(changes)} change(s)")
    return 0
