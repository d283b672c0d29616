"""CLI: controller run, pair up/down, status, events, ownership, promote/demote, resolve.

The stable command-line contract of the main job (see README): `pair up`
returns once both controllers serve, and with --json prints the exports as
NBD URIs, and refuses options that contradict the pair already under --dir;
`status` reports role, link, owned LUNs, block counts and generation per
controller; `events` merges both controllers' event files by time.
"""
import json
import pathlib
import sys
import time

import hal.runtime.config as C
from hal.cli.errors import CommandFailed, UsageError


def register(sub):
    p = sub.add_parser("controller", help="run one controller")
    csub = p.add_subparsers(dest="controller_cmd", required=True)
    run = csub.add_parser("run", help="run one controller in the foreground")
    run.add_argument("--config", required=True, help="the controller's TOML file")
    run.set_defaults(func=cmd_controller_run)

    p = sub.add_parser("pair", help="a local controller pair")
    psub = p.add_subparsers(dest="pair_cmd", required=True)
    up = psub.add_parser("up", help="start (or restart) a local pair under DIR",
                         description="Create a pair under DIR, or restart the one there as it was made: "
                                     "an option that contradicts the existing pair is refused (exit 2).")
    up.add_argument("--dir", required=True)
    up.add_argument("--luns", type=int, help="number of LUNs (default 2)")
    up.add_argument("--lun-size", help="size of each LUN (default 256M)")
    up.add_argument("--nvram-size", help="each controller's NVRAM (default 64M)")
    up.add_argument("--durability", choices=("controller", "host"), help="default controller")
    up.add_argument("--link", choices=("unix", "tcp"), help="default unix")
    up.add_argument("--mode", choices=("ha", "replica"), help="default ha")
    up.add_argument("--replica-variant", choices=("bitmap", "log"),
                    help="replica mode: cache-acknowledged with a destage bitmap (the default), or NVRAM-log "
                         "shipping (a is the source, b the destination)")
    up.add_argument("--cp-interval-ms", type=int,
                    help="log variant: a consistency point at least this often (default 2000)")
    up.add_argument("--ack", choices=("cache", "nvram", "disk"), default=None,
                    help="replica mode: where the secondary holds a copy before it acknowledges")
    up.add_argument("--resync-rate", default=None, help="replica mode: resync bytes per second (like 50M)")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for both to serve")
    up.add_argument("--tls", action="store_true",
                    help="NBD over TLS only: a throwaway CA and certificates under DIR/tls, client "
                         "certificates checked; prints the client options")
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

    dm = sub.add_parser("demote", help="replica mode: make the primary NAME a secondary (read-only)",
                        description="Replica mode: make the primary NAME a secondary, so the other can be "
                                    "promoted. Refused while hosts are connected to NAME's exports, while "
                                    "host writes are being copied, during a handshake, resync or split brain, "
                                    "and when NAME is not primary. With NAME demoted no side takes writes "
                                    "until one is promoted.")
    dm.add_argument("name", choices=("a", "b"))
    dm.add_argument("--dir", required=True)
    dm.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the link to be mirrored (or down) again afterwards")
    dm.set_defaults(func=cmd_demote)

    rs = sub.add_parser("resolve", help="replica mode: resolve a split brain by discarding one side")
    rs.add_argument("--dir", required=True)
    rs.add_argument("--policy", required=True,
                    choices=("discard-younger-primary", "discard-fewer-changes", "discard-a", "discard-b"))
    rs.set_defaults(func=cmd_resolve)

    ev = sub.add_parser("events", help="both controllers' events as JSON lines, merged in time order")
    ev.add_argument("--dir", required=True)
    ev.add_argument("--follow", "-f", action="store_true", help="keep waiting for new events")
    ev.add_argument("--since", metavar="WHEN", help="only events from WHEN on: seconds ago with a unit "
                    "(30s, 5m, 2h, 1d) or an ISO 8601 time (2024-05-01T12:00:00, local time unless it "
                    "has a zone like +00:00)")
    ev.add_argument("--kind", action="append", metavar="KIND[,KIND...]",
                    help="only these kinds (repeatable, or a comma list), like link_down,takeover")
    ev.set_defaults(func=cmd_events)


def cmd_controller_run(args):
    from hal.backends.interfaces import HalError
    from hal.runtime.logship import make_runtime
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
    from hal.tools.pair import LocalPair
    return LocalPair(args.dir)


def _existing_pair(args):
    """The pair under --dir; no pair there is bad input (exit 2), not a traceback."""
    from hal.tools.pair import PairError
    pair = _pair(args)
    try:
        pair.meta()
    except PairError as exc:
        raise UsageError(str(exc)) from None
    return pair


# pair up's options: their defaults for a new pair, and where an existing pair keeps each one.
UP_DEFAULTS = dict(luns=2, lun_size="256M", nvram_size="64M", durability="controller", link="unix",
                   mode="ha", replica_variant="bitmap", cp_interval_ms=2000)
UP_META_KEYS = dict(luns="luns", lun_size="lun_size_bytes", nvram_size="nvram_size_bytes",
                    durability="durability", link="link", mode="mode", replica_variant="replica_variant",
                    cp_interval_ms="cp_interval_ms")
SIZE_OPTIONS = ("lun_size", "nvram_size")


def _size_text(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args, name: str):
    """An option as the user gave it (sizes in bytes); None when not given."""
    value = getattr(args, name)
    if value is None or name not in SIZE_OPTIONS:
        return value
    try:
        return C.parse_size(value, _option(name))
    except C.ConfigError as exc:
        raise UsageError(str(exc)) from None


def _contradictions(meta: dict, args) -> list:
    """The options given that differ from what the existing pair was created with."""
    found = []
    have_replica = meta.get("replica", {})
    for name, key in UP_META_KEYS.items():
        want, have = _given(args, name), meta.get(key)
        if want is not None and want != have:
            shown = _size_text(have) if name in SIZE_OPTIONS and have else have
            found.append(f"{_option(name)} {getattr(args, name)} (it has {shown or 'none: it is ' + meta['mode']})")
    for name in ("ack", "resync_rate"):
        want = getattr(args, name)
        if want is not None and want != have_replica.get(name):
            found.append(f"{_option(name)} {want} (it has {have_replica.get(name) or 'the default'})")
    return found


def _check_existing(pair, args):
    """pair up restarts a pair as it was made; options that say otherwise are refused, not ignored."""
    if not pair.meta_path.exists():
        return {}
    meta = pair.meta()
    wrong = _contradictions(meta, args)
    if wrong:
        raise UsageError(f"{pair.dir} holds a {meta['mode']} pair made with other options: {'; '.join(wrong)}. "
                         f"pair up restarts a pair as it was made; to change it, `twincache pair down --dir "
                         f"{pair.dir}`, remove that directory (its data goes with it) and run pair up again, "
                         f"or use another --dir")
    return {name: meta[key] for name, key in UP_META_KEYS.items() if key in meta}


def cmd_pair_up(args):
    from hal.tools.pair import PairError
    pair = _pair(args)
    for name, value in dict(UP_DEFAULTS, **_check_existing(pair, args)).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    sizes = dict(lun_size_bytes=_given(args, "lun_size"), nvram_size_bytes=_given(args, "nvram_size"))
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
        result = pair.up(luns=args.luns, link=args.link, durability=args.durability,
                         mode=args.mode, timeout_s=args.timeout, replica=replica, tls=args.tls, metrics=args.metrics,
                         **sizes, **variant)
    except PairError as exc:
        raise CommandFailed(str(exc)) from None
    tls = _tls_clients(pair, result["controllers"])
    if args.json:
        print(json.dumps({"controllers": result["controllers"], **({"tls": tls} if tls else {})}))
        return 0
    for c in result["controllers"]:
        started = " (started)" if c["name"] in result["started"] else " (already running)"
        print(f"controller {c['name']}: pid {c['pid']}{started}")
        for name, uri in c["exports"].items():
            print(f"  {name}  {uri}")
        if c.get("metrics"):
            print(f"  metrics  {c['metrics']}")
    if tls:
        _print_tls(tls)
    return 0


def _tls_clients(pair, controllers) -> dict:
    """With TLS: the client certificate directory and, per controller and export, the client options."""
    client_dir = pair.tls_client_dir()
    if client_dir is None:
        return {}
    from hal.host.tls_certs import client_options
    exports = {}
    for c in controllers:
        sock = str(pair.dir / c["name"] / "nbd.sock")
        exports[c["name"]] = {name: client_options(client_dir, sock, name) for name in c["exports"]}
    return {"client_dir": client_dir, "exports": exports}


def _print_tls(tls):
    print(f"\nTLS required (client certificates checked); client files in {tls['client_dir']}:")
    name, opts = next(iter(tls["exports"]["a"].items()))
    print(f"  qemu:   --object {opts['qemu_object']}")
    print(f"          --image-opts {opts['qemu_image_opts']}")
    print(f"  e.g.    qemu-io --object {opts['qemu_object']} -c 'read 0 1M' --image-opts {opts['qemu_image_opts']}")
    for ctrl, exports in tls["exports"].items():
        for name, opts in exports.items():
            print(f"  libnbd ({ctrl} {name}): {opts['uri']}")


def cmd_pair_down(args):
    pair = _existing_pair(args)
    stopped = pair.down()
    print("stopped " + (", ".join(stopped) if stopped else "nothing (no controller was running)"))
    return 0


def cmd_status(args):
    pair = _existing_pair(args)
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
        ls = st.get("link_stats") or {}
        if ls.get("auth_failures") or ls.get("auth_replays"):
            print(f"  link frames refused: {ls.get('auth_failures', 0)} failed authentication, "
                  f"{ls.get('auth_replays', 0)} replayed")
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
    from hal.runtime.control import request
    pair = _existing_pair(args)
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
    from hal.runtime.control import request as send
    pair = _existing_pair(args)
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


def cmd_demote(args):
    """Demote, then wait for the new handshake to settle, so `demote a && promote b` works."""
    answer = _replica_command(args, args.name, {"cmd": "demote"})
    if "error" in answer:
        raise CommandFailed(f"controller {args.name}: {answer['error']}")
    pair = _pair(args)
    deadline = time.monotonic() + args.timeout
    links = {}
    while time.monotonic() < deadline:
        links = {n: pair.status(n).get("link", "stopped") for n in ("a", "b")}
        if set(links.values()) in ({"mirrored"}, {"down", "stopped"}):     # reconnected, or no peer to
            break
        time.sleep(0.05)
    else:
        raise CommandFailed(f"controller {args.name} is secondary, but the link did not settle within "
                            f"{args.timeout} s ({', '.join(f'{n} {v}' for n, v in links.items())}): "
                            f"see `twincache status --dir {args.dir}`")
    print(f"controller {args.name} is secondary (generation {answer.get('generation', '?')}); "
          f"promote a controller to take writes again")
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
    from hal.runtime.control import request
    pair = _existing_pair(args)
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


def parse_since(text: str, now_s: float) -> float:
    """`--since`: seconds ago with a unit (90s, 5m, 2h, 1d) or an ISO 8601 time (local if no zone)."""
    import datetime
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now_s - float(text[:-1]) * units[text[-1]]
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"--since {text!r}: give seconds ago with a unit (30s, 5m, 2h, 1d) "
                         f"or an ISO 8601 time (2024-05-01T12:00:00)") from None


class EventFile:
    """One controller's events.jsonl, read on from where the last read ended (whole lines only)."""

    def __init__(self, path):
        self.path, self.offset = path, 0

    def read_new(self) -> list:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        data = data[:data.rfind(b"\n") + 1]
        self.offset += len(data)
        events = []
        for line in data.decode(errors="replace").splitlines(keepends=True):
            try:
                event = json.loads(line)
                events.append((float(event["ts"]), str(event.get("kind", "")), line))
            except (ValueError, KeyError, TypeError):
                continue       # not an event record (a hand edit, a torn write before a crash)
        return events


FOLLOW_LAG_S = 1.0     # events -f holds back this long, so a controller's late-written event still sorts


def cmd_events(args):
    """Both controllers' events as one stream, in time order. Following, an event is printed once
    it is FOLLOW_LAG_S old: the two controllers write their files independently, and one that
    wrote an earlier event a little later (a busy machine) would otherwise follow a newer one."""
    import heapq
    pair = _existing_pair(args)
    since = parse_since(args.since, time.time()) if args.since else None
    kinds = {k.strip() for group in args.kind or () for k in group.split(",") if k.strip()}
    files = [EventFile(pathlib.Path(pair.dir) / n / "events.jsonl") for n in ("a", "b")]
    held, order = [], 0          # a heap of (ts, order, line) read but not yet printed
    try:
        while True:
            for f in files:
                for ts, kind, line in f.read_new():
                    if (since is None or ts >= since) and (not kinds or kind in kinds):
                        heapq.heappush(held, (ts, order, line))
                        order += 1
            due = time.time() - FOLLOW_LAG_S if args.follow else float("inf")
            while held and held[0][0] <= due:
                sys.stdout.write(heapq.heappop(held)[2])
            sys.stdout.flush()
            if not args.follow:
                return 0
            time.sleep(0.1)
    except KeyboardInterrupt:
        return 0
