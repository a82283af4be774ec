#!/usr/bin/python3
"""Prints a results file of bench/run as Markdown tables (for docs/performance.md).

    bench/report.py bench/results/<file>.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    with open(sys.argv[1]) as f:
        r = json.load(f)
    m, v = r["machine"], r.get("versions", {})
    s = r["settings"]
    print(f"Run `{os.path.basename(sys.argv[1])}`: {r['started_utc']}, {r['elapsed_secs'] / 60:.1f} min, "
          f"{s['rounds']} rounds, {'valid' if r.get('valid', True) else 'INVALID'}.")
    print(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('mem_gib')} GiB, Debian {m.get('debian')}, "
          f"kernel {m.get('kernel')}.")
    if v:
        print(f"Software: {v.get('dovecot') and 'Dovecot ' + v['dovecot']}, {v.get('nginx')}, {v.get('haproxy')}, "
              f"{v.get('openssl')}, Python {v.get('python')} ({v.get('python_ssl')}), argon2-cffi "
              f"{v.get('argon2_cffi')}; mailgate at {str(v.get('git_commit'))[:10]}"
              f"{' plus uncommitted changes in src/' if v.get('git_src_dirty') else ''}.")
    if r.get("floor_only"):
        print(bench.floor_text(r, markdown=True))
        print()
        print(bench.host_text(r.get("host")))
        return
    print()
    print(bench.table(r, markdown=True))
    print()
    if r.get("floor"):
        print(bench.floor_text(r, markdown=True))
        print()
    if r.get("host"):
        print(bench.host_text(r["host"]))
        print()
    print(bench.targets_text(r, markdown=True))
    print()
    if r.get("old_vs_new"):
        print(f"New (`{v.get('mailgate_binary')}`) against old (`{v.get('mailgate_old_binary')}`), same run:")
        print()
        print(bench.compare_text(r, markdown=True))
        print()
    foreign = [x.get("foreign_cpu_pct") for x in r["measurements"] if x.get("foreign_cpu_pct") is not None]
    if foreign:
        over = sum(1 for x in foreign if x > s.get("max_foreign", 10))
        print(f"Other work on the machine during the measurements: median {bench.med(foreign):.1f} % of the CPUs, "
              f"{over} of {len(foreign)} kept measurements above {s.get('max_foreign', 10):.0f} % after repeats.")
    idle = [x["idle_cpu_pct"] for x in r["measurements"]]
    low = sum(1 for x in idle if x < s["min_idle"])
    print(f"Idle CPU at the start of the {len(idle)} measurements: median {bench.med(idle):.0f} %, "
          f"{low} below {s['min_idle']:.0f} % (the quiet wait timed out).")


if __name__ == "__main__":
    main()
