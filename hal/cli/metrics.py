"""CLI: `twincache metrics --dir DIR [NAME]`, the controllers' Prometheus metrics as text.

Reads each controller's [metrics] listen from its config.toml under DIR, fetches
its /metrics over loopback HTTP and prints it, preceded by a comment line
naming the controller and the URL (comments are valid in the text format, so
the output still parses).
"""
import urllib.error
import urllib.request

import hal.runtime.config as C
from hal.cli.errors import CommandFailed, UsageError

FETCH_TIMEOUT_S = 5.0


def register(sub):
    m = sub.add_parser("metrics", help="print the controllers' Prometheus metrics (text format)")
    m.add_argument("--dir", required=True)
    m.add_argument("name", nargs="?", choices=("a", "b"), help="one controller (default: both)")
    m.set_defaults(func=cmd_metrics)


def metrics_url(pair, name) -> str:
    from hal.runtime.metrics import url_of
    try:
        cfg = C.load(pair.config_path(name))
    except C.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not cfg.metrics.listen:
        raise UsageError(f"controller {name}: metrics are off (no [metrics] listen in {pair.config_path(name)}; "
                         f"a pair made by `pair up` has them unless --no-metrics)")
    return url_of(cfg.metrics.listen)


def fetch(url) -> str:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as reply:
            return reply.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandFailed(f"{url}: {reason} (is the controller running? `twincache status`)") from None


def cmd_metrics(args):
    from hal.tools.pair import LocalPair, PairError
    pair = LocalPair(args.dir)
    try:
        pair.meta()
    except PairError as exc:
        raise UsageError(str(exc)) from None
    names = [args.name] if args.name else ["a", "b"]
    urls = {name: metrics_url(pair, name) for name in names}
    for name in names:
        text = fetch(urls[name])
        print(f"# controller {name}: {urls[name]}")
        print(text, end="" if text.endswith("\n") else "\n")
    return 0
