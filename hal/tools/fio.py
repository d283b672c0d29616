"""Running fio's nbd engine for the benchmarks: one run's figures, the CPUs fio and the servers
are pinned to, and a process's CPU time."""
import json
import os
import subprocess

VOLUME_BYTES = 256 << 20
FIO_CPU, SERVER_CPU = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pin(pid):
    subprocess.run(["taskset", "-a", "-p", "-c", SERVER_CPU, str(pid)], capture_output=True)


def fio(uri, workload, seconds, wrap=None):
    """One fio run; `wrap` is a command prefix for fio itself (hal/tools/bench_tls.py: its HOME)."""
    args = ["taskset", "-c", FIO_CPU] + (wrap or []) + ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}",
            f"--size={VOLUME_BYTES}", f"--runtime={seconds}", "--time_based", "--ramp_time=1",
            "--output-format=json", "--randrepeat=0", "--norandommap"]
    args += [f"--{k}={v}" for k, v in workload.items()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    doc = json.loads(out.stdout[out.stdout.index("{"):])
    w = doc["jobs"][0]["write"]
    pct = w.get("clat_ns", {}).get("percentile", {})
    return {"iops": w["iops"], "mbps": w["bw_bytes"] / 1e6,
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}


def cpu_seconds(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
