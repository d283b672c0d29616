"""CLI: controller run, pair up/down, status, events.

The stable command-line contract of the main job (see README): `pair up`
returns once both controllers serve, and with --json prints the exports as
NBD URIs; `status` reports role, link, owned LUNs, block counts and
generation per controller.
"""
import json
import os
import pathlib
import sys
import time

from . import config as C
from .cli import CommandFailed, UsageError


def register(sub):
    p = sub.add_parser("controller", help="run one controller")
    csub = p.add_subparsers(dest="controller_cmd", required=True)
    run = csub.add_parser("run", help="run one controller in the foreground")
    run.add_argument("--config", required=True, help="the controller's TOML file")
    run.set_defaults(func=cmd_controller_run)

    p = sub.add_parser("pair", help="a local controller pair")
    psub = p.add_subparsers(dest="pair_cmd", required=True)
    up = psub.add_parser("up", help="start (or restart) a local pair under DIR")
    up.add_argument("--dir", required=True)
    up.add_argument("--luns", type=int, default=2)
    up.add_argument("--lun-size", default="256M")
    up.add_argument("--nvram-size", default="64M")
    up.add_argument("--durability", choices=("controller", "host"), default="controller")
    up.add_argument("--link", choices=("unix", "tcp"), default="unix")
    up.add_argument("--mode", choices=("ha", "replica"), default="ha")
    up.add_argument("--replica-variant", choices=("bitmap", "log"), default="bitmap",
                    help="replica mode: cache-acknowledged with a destage bitmap, or NVRAM-log shipping "
                         "(a is the source, b the destination)")
    up.add_argument("--cp-interval-ms", type=int, default=2000,
                    help="log variant: a consistency point at least this often")
    up.add_argument("--ack", choices=("cache", "nvram", "disk"), default=None,
                    help="replica mode: where the secondary holds a copy before it acknowledges")
    up.add_argument("--resync-rate", default=None, help="replica mode: resync bytes per second (like 50M)")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for both to serve")
    up.add_argument("--no-metrics", dest="metrics", action="store_false",
                    help="a new pair without the metrics endpoints (by default each controller serves "
                         "Prometheus metrics on a free loopback port)")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_pair_up)
    down = psub.add_parser("down", help="stop the pair under DIR")
    down.add_argument("--dir", required=True)
    down.set_defaults(func=cmd_pair_down)

    st = sub.add_parser("status", help="per controller: role, link, LUNs, blocks, generation")
    st.add_argument("--dir", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    rec = sub.add_parser("recover", help="log variant: apply every request in the destination's file "
                                          "to the image volume (after a disaster at the source)")
    rec.add_argument("--dir", required=True)
    rec.add_argument("--source", help="the source whose image to recover (default: every source)")
    rec.add_argument("--timeout", type=float, default=120.0)
    rec.set_defaults(func=cmd_recover)

    own = sub.add_parser("ownership", help="move LUN ownership between the controllers")
    osub = own.add_subparsers(dest="ownership_cmd", required=True)
    mv = osub.add_parser("move", help="make controller --to the owner of LUN")
    mv.add_argument("lun", help="lun0, lun1, ... or a number")
    mv.add_argument("--to", required=True, choices=("a", "b"))
    mv.add_argument("--dir", required=True)
    mv.add_argument("--timeout", type=float, default=30.0)
    mv.set_defaults(func=cmd_ownership_move)

    pr = sub.add_parser("promote", help="replica mode: make controller NAME the primary")
    pr.add_argument("name", choices=("a", "b"))
    pr.add_argument("--dir", required=True)
    pr.add_argument("--force", action="store_true", help="even if its data is inconsistent (mid-resync)")
    pr.set_defaults(func=cmd_promote)

    rs = sub.add_parser("resolve", help="replica mode: resolve a split brain by discarding one side")
    rs.add_argument("--dir", required=True)
    rs.add_argument("--policy", required=True,
                    choices=("discard-younger-primary", "discard-fewer-changes", "discard-a", "discard-b"))
    rs.set_defaults(func=cmd_resolve)

    ev = sub.add_parser("events", help="stream the pair's events as JSON lines")
    ev.add_argument("--dir", required=True)
    ev.add_argument("--follow", "-f", action="store_true", help="keep waiting for new events")
    ev.set_defaults(func=cmd_events)


def cmd_controller_run(args):
    from .interfaces import HalError
    from .runtime_log import make_runtime
    from firmware.formats import FormatError
    try:
        cfg = C.load(args.config)
    except C.ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        runtime = make_runtime(cfg)
    except (HalError, FormatError, OSError) as exc:
        raise CommandFailed(f"controller {cfg.name}: {exc}") from None
    runtime.run()
    return 0


def _pair(args):
    from .pair import LocalPair
    return LocalPair(args.dir)


def cmd_pair_up(args):
    from .pair import PairError
    try:
        sizes = dict(lun_size_bytes=C.parse_size(args.lun_size, "--lun-size"),
                     nvram_size_bytes=C.parse_size(args.nvram_size, "--nvram-size"))
    except C.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.cp_interval_ms <= 0:
        raise UsageError(f"--cp-interval-ms {args.cp_interval_ms}: must be positive")
    replica = {}
    if args.ack:
        replica["ack"] = args.ack
    if args.resync_rate:
        replica["resync_rate"] = args.resync_rate
    if replica and (args.mode != "replica" or args.replica_variant != "bitmap"):
        raise UsageError("--ack and --resync-rate are for --mode replica (bitmap variant)")
    variant = dict(replica_variant=args.replica_variant, cp_interval_ms=args.cp_interval_ms) \
        if args.mode == "replica" else {}
    try:
        result = _pair(args).up(luns=args.luns, link=args.link, durability=args.durability,
                                mode=args.mode, timeout_s=args.timeout, replica=replica, metrics=args.metrics,
                                **sizes, **variant)
    except PairError as exc:
        raise CommandFailed(str(exc)) from None
    if args.json:
        print(json.dumps({"controllers": result["controllers"]}))
        return 0
    for c in result["controllers"]:
        started = " (started)" if c["name"] in result["started"] else " (already running)"
        print(f"controller {c['name']}: pid {c['pid']}{started}")
        for name, uri in c["exports"].items():
            print(f"  {name}  {uri}")
        if c.get("metrics"):
            print(f"  metrics  {c['metrics']}")
    return 0


def cmd_pair_down(args):
    pair = _pair(args)
    pair.meta()
    stopped = pair.down()
    print("stopped " + (", ".join(stopped) if stopped else "nothing (no controller was running)"))
    return 0


def cmd_status(args):
    pair = _pair(args)
    pair.meta()
    report = [pair.status(name) for name in ("a", "b")]
    if args.json:
        print(json.dumps({"controllers": report}))
        return 0
    for st in report:
        if "pid" not in st:
            print(f"controller {st['controller']}: {st.get('state')} ({st.get('error', '')})")
            continue
        if st.get("replica_variant") == "log":
            _print_log_status(st)
            continue
        print(f"controller {st['name']} (pid {st['pid']}): {st['role']}, link {st['link']}, "
              f"generation {st['generation']}, owns {', '.join(st['owned_luns']) or 'no LUN'}")
        if "replica" in st:
            _print_replica(st)
            continue
        print(f"  primary: {st['dirty_blocks']} dirty, {st['free_blocks']} free of "
              f"{st['primary_blocks']} blocks; mirror: {st['mirror_blocks']} blocks held for the partner")
        sync = st.get("resync")
        if sync:
            print(f"  resync to the partner: {sync['lines_transferred']} lines transferred, "
                  f"{sync['lines_remaining']} remaining of {sync['lines_total']}")
        for lun, info in sorted(st.get("luns", {}).items()):
            if info.get("state") == "releasing":
                print(f"  {lun}: handing over, {info.get('dirty_lines', 0)} dirty lines to destage first")
        for lun, disk in sorted(st.get("disks", {}).items()):
            if disk["state"] != "ok":
                print(f"  {lun}: disk {disk['state'].upper()}: writes failing for {disk['failing_ms'] / 1000:.1f} s "
                      f"({disk['errors']} failed), next retry in {disk['retry_in_ms']} ms"
                      + ("; new writes get EIO, reads are served" if disk["state"] == "degraded" else ""))
    return 0


def _print_log_status(st):
    print(f"controller {st['name']} (pid {st['pid']}): log {st['role']}, link {st['link']}")
    if st["role"] == "source":
        print(f"  logged through seq {st['next_seq'] - 1}; destination holds through {st['acked_seq']} "
              f"({st['unshipped_entries']} unshipped); applied here through {st['applied_seq']}, "
              f"at the destination through {st['destination_applied_seq']}")
        print("  partitions: " + ", ".join(f"{p['index']} {p['state']} {p['entries']} entries "
                                           f"{p['used_bytes'] * 100 // p['size_bytes']}%" for p in st["partitions"]))
        if st.get("gap"):
            print(f"  DESTINATION GAP {st['gap']}: shipping stopped (see events)")
        return
    for name, src in st["sources"].items():
        print(f"  source {name}: link {src['link']}, stored {src['stored_seq']}, filed {src['filed_seq']}, "
              f"applied {src['applied_seq']} ({src['consistency_points']} consistency points), "
              f"{src['nvram_entries']} in NVRAM, {src['file_records']} in the file not yet applied")


def cmd_recover(args):
    from .control import request
    pair = _pair(args)
    meta = pair.meta()
    if meta.get("replica_variant") != "log":
        raise UsageError(f"{pair.dir}: recover is for a log-variant replica pair (pair up --mode replica "
                         f"--replica-variant log)")
    try:
        answer = request(pair.control_path("b"), {"cmd": "recover", "source": args.source}, timeout_s=10)
    except OSError as exc:
        raise CommandFailed(f"the destination (b) is not reachable: {exc}") from None
    if "error" in answer:
        raise CommandFailed(f"destination: {answer['error']}")
    deadline = time.monotonic() + args.timeout
    targets = answer["targets"]
    while time.monotonic() < deadline:
        st = pair.status("b")
        left = {n: t - st["sources"][n]["applied_seq"] for n, t in targets.items()
                if st["sources"][n]["applied_seq"] < t}
        if not left:
            for n, t in targets.items():
                print(f"image of {n} recovered through seq {st['sources'][n]['applied_seq']}")
            return 0
        print("recovering: " + ", ".join(f"{n} {k} requests to apply" for n, k in left.items()), file=sys.stderr)
        time.sleep(0.2)
    raise CommandFailed(f"recovery did not finish within {args.timeout} s")


def _print_replica(st):
    r = st["replica"]
    print(f"  replica ({r['variant']}): state {r['state']}{' -- SPLIT BRAIN: run twincache resolve' if r['split_brain'] else ''}"
          f", ack level {r['ack_level']}, flags {','.join(r['flags']) or '-'}")
    print(f"  record: {r['record_bits']} ranges ({r['record_bytes']} B) copied to the peer and not destaged "
          f"there; {r['received_bits']} ranges the peer has not destaged; {st['dirty_blocks']} dirty blocks here")
    print(f"  generation ids: current {r['current_uuid']} bitmap {r['bitmap_uuid']} "
          f"history {' '.join(r['history'])}")
    rs = r["resync"]
    if rs:
        print(f"  resync: {rs['remaining_bytes']} of {rs['total_bytes']} B remaining, "
              f"{rs['rate_bytes_s'] / 1e6:.1f} MB/s")


def _replica_command(args, name, request):
    from .control import request as send
    pair = _pair(args)
    pair.meta()
    try:
        return send(pair.control_path(name), request)
    except OSError as exc:
        raise CommandFailed(f"controller {name} is not reachable: {exc}") from None


def cmd_promote(args):
    answer = _replica_command(args, args.name, {"cmd": "promote", "force": args.force})
    if "error" in answer:
        raise CommandFailed(f"controller {args.name}: {answer['error']}")
    print(f"controller {args.name} is primary (generation {answer.get('generation', '?')})")
    return 0


def cmd_resolve(args):
    """Both controllers hear the policy; the one it names as the victim discards its data."""
    answers, errors = {}, []
    for name in ("a", "b"):
        try:
            answers[name] = _replica_command(args, name, {"cmd": "resolve", "policy": args.policy})
        except CommandFailed as exc:
            errors.append(str(exc))
    for name, answer in answers.items():
        if "victim" in answer:
            print(f"split brain resolved by {args.policy}: controller {answer['victim']}'s changes are "
                  f"discarded; it resyncs from its peer")
            return 0
    reasons = [f"{n}: {a.get('error')}" for n, a in answers.items()] + errors
    raise CommandFailed("nothing resolved (" + "; ".join(reasons) + ")")


def cmd_ownership_move(args):
    from .control import request
    pair = _pair(args)
    pair.meta()
    text = args.lun[3:] if args.lun.startswith("lun") else args.lun
    if not text.isdigit():
        raise UsageError(f"{args.lun!r} is not a LUN (lun0, lun1, ...)")
    lun = int(text)
    try:
        answer = request(pair.control_path(args.to), {"cmd": "move", "lun": lun})
    except OSError as exc:
        raise CommandFailed(f"controller {args.to} is not reachable: {exc}") from None
    if "error" in answer:
        raise CommandFailed(f"controller {args.to}: {answer['error']}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        st = pair.status(args.to)
        if f"lun{lun}" in st.get("owned_luns", []) and st["luns"][f"lun{lun}"]["state"] == "owner":
            print(f"lun{lun} is owned by {args.to} (generation {st['luns'][f'lun{lun}']['generation']})")
            return 0
        time.sleep(0.05)
    raise CommandFailed(f"lun{lun} did not move to {args.to} within {args.timeout} s")


def cmd_events(args):
    pair = _pair(args)
    pair.meta()
    paths = [pathlib.Path(pair.dir) / n / "events.jsonl" for n in ("a", "b")]
    offsets = {p: 0 for p in paths}
    try:
        while True:
            for path in paths:
                if not path.exists():
                    continue
                with open(path) as f:
                    f.seek(offsets[path])
                    for line in f:
                        if line.endswith("\n"):
                            sys.stdout.write(line)
                            offsets[path] += len(line.encode())
                        else:
                            break
            sys.stdout.flush()
            if not args.follow:
                return 0
            time.sleep(0.1)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
