#!/usr/bin/env python3
"""The table of benches/e2e.sh: medians per gateway over the rounds, the ratio of
sitegate to the best anchor of the same run in every row, and issue 11's targets.

Usage (from e2e.sh): e2e_report.py JSON RESULTS SECS HS_SECS ROUNDS CLIENT MTU
                     PEERS MACHINE ELAPSED VERSIONS
"""
import datetime
import json
import statistics
import sys

(as_json, path, secs, hs_secs, rounds, client, mtu, npeers, machine, elapsed,
 versions) = sys.argv[1:12]
as_json = as_json == "1"
raw = [json.loads(line) for line in open(path) if line.strip()]
versions = dict(v.split("=", 1) for v in versions.splitlines() if "=" in v)
ANCHORS = ("wireguard-go", "boringtun-cli", "gotatun-cli")

# (phase, key, label, unit, higher is better, target: (reference, op, value) or None)
METRICS = [
    ("throughput", "up_mbit_s", "TCP 1 stream up", "Mbit/s", True, ("best", ">=", 1.2)),
    ("throughput", "up_cpu_s_per_gb", "gateway CPU per GB, TCP up", "s/GB", False, ("best", "<=", 0.5)),
    ("throughput", "up_cpu_softirq_s_per_gb", "  + machine softirq, TCP up", "s/GB", False, None),
    ("throughput", "down_mbit_s", "TCP 1 stream down (-R)", "Mbit/s", True, None),
    ("throughput", "down_cpu_s_per_gb", "gateway CPU per GB, TCP down", "s/GB", False, None),
    ("throughput", "udp_pps", "UDP 64 B up, received", "pkt/s", True, None),
    ("throughput", "udp_cpu_us_per_packet", "gateway CPU per 64 B packet", "us/pkt", False, ("best", "<=", 0.67)),
    ("handshake", "answered_per_s", "handshakes answered (3000/s offered)", "1/s", True, ("boringtun-cli", ">=", 1.5)),
    ("handshake", "gateway_cpu_us_per_handshake", "gateway CPU per handshake", "us", False, ("boringtun-cli", "<=", 0.6)),
    ("rss", "rss_mib", f"RSS with {npeers} issued peers", "MiB", False, ("absolute", "<=", 64)),
]

for r in raw:
    if r.get("phase") == "rss" and "rss_kib" in r:
        r["rss_mib"] = round(r["rss_kib"] / 1024, 1)


def usable(phase, gateway):
    ok = [r for r in raw if r.get("phase") == phase and r.get("gateway") == gateway and "error" not in r]
    if phase == "handshake":
        # handshake.sh marks rounds that shared the CPUs with another job;
        # the median is over the clean ones when there are any.
        clean = [r for r in ok if r.get("clean")]
        return clean or ok
    return ok


gateways = list(dict.fromkeys(r["gateway"] for r in raw if r.get("gateway") not in (None, "-")))
gateways.sort(key=lambda g: (g != "sitegate", g))

rows = []
for phase, key, label, unit, higher, target in METRICS:
    values, per_round = {}, {}
    for g in gateways:
        xs = [r[key] for r in usable(phase, g) if r.get(key) is not None]
        if xs:
            per_round[g] = xs
            values[g] = round(statistics.median(xs), 2)
    if not values:
        continue
    anchors = {g: v for g, v in values.items() if g in ANCHORS}
    best = None
    if anchors:
        best = (max if higher else min)(anchors, key=anchors.get)
    sg = values.get("sitegate")
    row = {"metric": key, "label": label, "unit": unit, "higher_is_better": higher,
           "median": values, "rounds": per_round, "best_anchor": best,
           "ratio_to_best": round(sg / anchors[best], 2) if sg is not None and best and anchors[best] else None}
    if target:
        ref, op, goal = target
        if ref == "absolute":
            got = sg
            desc = f"{op.replace('>=', '≥').replace('<=', '≤')} {goal} {unit}"
        else:
            refname = best if ref == "best" else ref
            got = round(sg / values[refname], 2) if sg is not None and refname in values and values[refname] else None
            desc = f"{op.replace('>=', '≥').replace('<=', '≤')} {goal}× {'best anchor' if ref == 'best' else ref}"
        met = None if got is None else (got >= goal if op == ">=" else got <= goal)
        row["target"] = {"text": desc, "value": got, "met": met}
    rows.append(row)

info = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": machine,
    "versions": versions,
    "settings": {"rounds": int(rounds), "iperf3_seconds": int(secs), "handshake_seconds": int(hs_secs),
                 "site": f"wireguard-go, {client}, MTU {mtu}", "udp_payload_bytes": 64,
                 "handshake": "1000 issued keys, 3000 initiations/s offered (benches/handshake.sh)",
                 "rss_peers": int(npeers)},
    "elapsed_s": int(elapsed),
}
if as_json:
    print(json.dumps(dict(info, rows=rows, results=raw), indent=2))
    sys.exit(0)

print(f"sitegate e2e benchmark, {info['date']}; {machine}")
print(f"site: {info['settings']['site']}; iperf3 -t {secs}; medians of {rounds} interleaved round(s)")
print("versions: " + "; ".join(f"{v or g}" for g, v in versions.items()))
cols = [g for g in gateways]
w = 13
head = f"{'metric':<38} {'unit':>7} " + " ".join(f"{g[:w]:>{w}}" for g in cols) + f" {'best anchor':>13} {'ratio':>6}  target"
print(head)
print("-" * len(head))
for r in rows:
    vals = " ".join(f"{str(r['median'].get(g, '-')):>{w}}" for g in cols)
    ratio = "-" if r["ratio_to_best"] is None else f"{r['ratio_to_best']}x"
    t = r.get("target")
    tt = ""
    if t:
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "not met")
        got = "-" if t["value"] is None else t["value"]
        tt = f"{t['text']}: {got}{'' if 'MiB' in t['text'] else 'x'} {verdict}"
    print(f"{r['label']:<38} {r['unit']:>7} {vals} {str(r['best_anchor'] or '-'):>13} {ratio:>6}  {tt}")
errors = [r for r in raw if "error" in r]
for e in errors:
    print(f"error: {e.get('phase')} {e.get('gateway')} round {e.get('round', '-')}: {e['error']}")
rss = [r for r in raw if r.get("phase") == "rss" and "rss_kib" in r]
if rss:
    print("RSS: " + "; ".join(f"{r['gateway']} {r['rss_mib']} MiB, {r['peers_configured']} peers, {r['threads']} threads"
                             for r in rss) + f" (peers issued to sitegate in {rss[0]['issue_s']} s)")
off = next((r["offloads"] for r in raw if r.get("phase") == "throughput" and r.get("gateway") == "sitegate"
            and "offloads" in r), None)
if off:
    print("offloads (sitegate run): " + "; ".join(f"{k}: {v}" for k, v in off.items()))
print("ratio: sitegate / best anchor of this run (best = highest rate, lowest CPU or memory). CPU is the")
print("gateway's utime+stime (/proc/PID/stat, all threads); '+ machine softirq' adds the softirq ticks of")
print("all CPUs in the same window (kernel packet work on both sides, the site's too; an upper bound).")
print(f"elapsed: {elapsed} s")
